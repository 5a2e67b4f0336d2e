"""The paper's experiments, runnable offline: datasets, models, training and sweeps, the
information measurements and the command line (``python -m shade_ops``).

The library (``shade_ops``: ops, states, modules, reference) never imports this package; this
package uses only the library's public functions and ``shade_ops.modules``.

    data           local datasets (digits-m, mnist-m-5k, ...) and their splits
    models         the MLPs, CNNs and CIFAR ResNets of the experiments (``build_model``)
    training       one training run (``train``), the regulariser sweep (``sweep``), reports
    architectures  the comparison across architectures
    information    binned per-unit entropies and mutual information of SHADE layers
    mechanism      the paper's Fig. 3 mechanism measurements
    files          atomic writes: every report, plot and metrics file
    cli            ``python -m shade_ops`` / ``shade-ops``
"""
