"""A settings dataclass per command, turned into argparse flags (kebab-case).

Each field becomes `--field-name`; its `help` and `choices` come from the field's metadata. The
resolved settings are printed once and saved beside the run's outputs, so every run records what
it did. Unknown flags and bad values are rejected like every user error: one line on stderr,
exit status 2 (`errors.ArgumentParser`).
"""

import argparse
import json
import math
from dataclasses import MISSING, asdict, field, fields
from pathlib import Path

from minirm.errors import ArgumentParser, UserError


def opt(default, help="", choices=None, **kw):
    """A settings field with its command-line help."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser(cls, prog, description):
    p = ArgumentParser(prog=prog, description=description,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        default = f.default if f.default is not MISSING else f.default_factory()
        kw = {"help": meta.get("help") or " ", "default": default, "dest": f.name}
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true" if not default else "store_false",
                           help=kw["help"], dest=f.name, default=default)
            continue
        if default is not None and not isinstance(default, (list, tuple)):
            kw["type"] = type(default)
        elif f.type in ("int | None", "int", int):
            kw["type"] = int
        elif f.type in ("float | None", "float", float):
            kw["type"] = float
        p.add_argument(flag, **kw)
    return p


def parse(cls, argv, prog, description):
    args = build_parser(cls, prog, description).parse_args(argv)
    return cls(**vars(args))


def describe(settings) -> str:
    return json.dumps(asdict(settings), indent=2, default=str)


def save_settings(settings, out: Path, name="config.json", extra=None):
    """Write the resolved settings (atomically) to OUT/config.json."""
    out.mkdir(parents=True, exist_ok=True)
    data = {**asdict(settings), **(extra or {})}
    tmp = out / f".{name}.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(out / name)


def positive(name, value, allow_zero=False):
    if value is None:
        return
    if not math.isfinite(value):  # argparse's float() reads "nan" and "inf"
        raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"--{name.replace('_', '-')} must be "
                        f"{'>= 0' if allow_zero else 'positive'}, got {value}")
