"""Analysis of SIMS runs: it reads callback payloads and run folders; ``sims_lens`` never imports it.

- :mod:`analysis.geometry`: cosines of steering directions across iterations and layers, drift, norms
- :mod:`analysis.separability`: probe accuracy and Fisher ratio of H+ vs H- per layer
- :mod:`analysis.observed`: every observed layer of an iteration: candidate direction (mean(H+) - mean(H-)),
  its drift, separability with its null, layer x layer cosines, a 2-D view of H+ and H-
- :mod:`analysis.logit_lens`: the tokens a direction promotes and suppresses through the unembedding;
  ``RUN/logit_lens.csv``
- :mod:`analysis.plots`: the plot helpers the figure modules share (colours, labels, heatmaps, lines)
- :mod:`analysis.figures`: plotly figures of a run (held-out, training, direction geometry) and their registry
- :mod:`analysis.observed_figures`: figures of every observed layer (layer x iteration heatmaps, 2-D view)
- :mod:`analysis.ablation_figures`: figures of the ablations and the layer sweep
- :mod:`analysis.pages`: the HTML pages: one per figure, the logit-lens table, ``RUN/figures/index.html``
- :mod:`analysis.live`: the loop callback that records metrics (and, given the model, the logit lens)
  and rewrites the figures every iteration
- :mod:`analysis.watch`: ``refresh(run_dir)``: the latest metrics and figures of a run in progress (notebooks)
- :mod:`analysis.report`: figures and the held-out summary rebuilt from a run folder alone
- :mod:`analysis.ablations`: held-out reward per layer, per left-out layer and per multiplier; the layer
  sweep (each observed layer steered alone with its candidate)
- :mod:`analysis.eval_report`: ``sims-lens eval``'s figures, summary table and ``index.html``
- :mod:`analysis.run_data`, :mod:`analysis.small_run`, :mod:`analysis.make_figures`:
  reading a run folder, making a small one, the README figures (plotly's static export, kaleido)
"""
