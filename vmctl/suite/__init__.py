"""`vmctl compare --suite`: the same workloads as native, container, docker, VM and QEMU columns.

model.py     results: samples, their statistics, columns, the whole run (JSON round trip)
rows.py      every measured row: unit, direction, Felter et al.'s published ratios beside it
ratios.py    ratio to native within one place (host or nested L1), comparability
tools/       one module per benchmark tool: its command line and the parser of its output
columns/     one module per way of running an instance (native, container, docker, vm, qemu)
workloads.py what each suite runs in an instance and which rows it fills
density.py, pagecache.py   the many-instances suites
runner.py    suites x columns, progress, cleanup on failure or Ctrl-C
report.py, plots.py        JSON, markdown, HTML; matplotlib figures (the `bench` extra)
"""
