"""Helpers the Python benchmark tools share (tools/bench-*); standard
library only. A tool imports it with tools/ on sys.path."""

import importlib.machinery
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")


def load_tool(name):
    """tools/NAME (a script without .py) as a module, e.g. bench-restart's
    Daemon harness and probe stream."""
    path = os.path.join(ROOT, "tools", name)
    mod_name = name.replace("-", "_")
    loader = importlib.machinery.SourceFileLoader(mod_name, path)
    spec = importlib.util.spec_from_loader(mod_name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def cpu_s(pid, children=False):
    """CPU seconds of process `pid` (all its threads), plus those of its
    children it has waited for with `children` (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        x = f.read().rsplit(")", 1)[1].split()
    t = int(x[11]) + int(x[12])
    if children:
        t += int(x[13]) + int(x[14])
    return t / TICK
