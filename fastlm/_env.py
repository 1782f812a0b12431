"""fastlm's environment switches, read one way everywhere.

A typo in a switch must not silently mean "off" (FASTLM_ATTENTION_WS=ture running the default
kernels while the user times "the warp-specialized ones"), nor "false" mean "on": every yes/no
switch goes through flag(), every number through integer(), and a value they do not know is a
ValueError that names the variable.  Standalone (no torch, no fastlm imports): setup.py loads
this file by path.
"""
import os

TRUE = ("1", "true", "yes", "on", "y")
FALSE = ("0", "false", "no", "off", "n", "")


def flag(name, default=False):
    """A yes/no switch: unset -> default; 1/true/yes/on/y or 0/false/no/off/n/empty (any case,
    surrounding spaces ignored); anything else raises ValueError naming the variable."""
    value = os.environ.get(name)
    if value is None:
        return default
    v = value.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise ValueError(f"environment variable {name}={value!r}: expected 1/true/yes/on/y or "
                     f"0/false/no/off/n (or unset, which means {'1' if default else '0'})")


def integer(name, default, *, lo=None, hi=None):
    """An integer setting: unset or empty -> default; else an int in [lo, hi] (None: unbounded),
    or ValueError naming the variable."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        n = int(value.strip())
    except ValueError:
        n = None
    if n is None or (lo is not None and n < lo) or (hi is not None and n > hi):
        if lo is not None and hi is not None:
            span = f" in [{lo}, {hi}]"
        elif lo is not None:
            span = f" >= {lo}"
        else:
            span = f" <= {hi}" if hi is not None else ""
        raise ValueError(f"environment variable {name}={value!r}: expected an integer{span}")
    return n


def triton_interpret():
    """Whether Triton runs its kernels in the interpreter: TRITON_INTERPRET read as Triton
    itself reads it (1/true/yes/on/y in any case, nothing stripped; anything else is off), so
    that fastlm never routes CPU tensors to Triton kernels that Triton will not interpret."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in TRUE
