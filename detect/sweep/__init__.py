"""The backbone sweep (`tools/sweep.py`): backbones x heads x initialisation x seeds, each cell an ordinary run.

A backbone paper's protocol: the same backbone under several detection heads, from scratch and pretrained, tabulated.
Every cell is a `tools/train_det.py` run directory, and every pretraining a `tools/train_cls.py` one; the sweep only
runs those tools as subprocesses, in fixed folders, and reads what they wrote. That keeps a cell identical to a run
a user would make by hand, and lets a cell be inspected, resumed or re-evaluated with the ordinary tools.

- `config`: the `SweepConfig` schema and the check of a sweep config against the tools' own schemas.
- `cells`: the cells, their folders, shards (`--cell K --of N`) and finished markers.
- `plan`: the checked sweep (`SweepPlan`) and the exact tool command of every run.
- `runner`: runs pretraining and cells (resume, restart, locks between shards, progress line).
- `locks`: the flock'd files shards take turns through (held by the tools they run until those exit).
- `measure`: parameters, GFLOPs and CPU latency of a cell's model.
- `report`, `plots`: means over seeds, the gain from pretraining, `sweep.csv`, `sweep.md` and the two pictures
  (written once per set of finished cells, however many shards ask); `rows`: the rows they share.

This package imports nothing heavy at import time: `tools/sweep.py --help` reads the schema without torch.
"""
