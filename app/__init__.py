"""The Calligrapher RL studio (Gradio 6): train, watch, infer and compare, through run directories.

    runs.py          run folders: list, status (dead-process detection), start, stop, resume
    procs.py         launching a detached training process; is a recorded pid still alive (and that run)
    presets.py       presets and the Train form <-> command-line flags; saving presets
    charts.py        plotly figures from metrics.jsonl rows
    inference.py     cached model stacks and inpainting for the Inference and Compare tabs
    gpu_room.py      may the studio load a model onto a card that training runs share (one-line refusals)
    views.py         Train callbacks;  monitor_views.py  Runs callbacks
    infer_views.py   Inference and Compare callbacks
    layout.py        the Blocks (wiring only);  server.py  `python app.py` flags and launch
"""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
