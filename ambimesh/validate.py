"""`ambimesh validate`: check YAML configuration as the controller would, without applying it.

The files are read by the controller's own YAML source (:mod:`controller.sources.files`)
and translated by its own :func:`controller.translate.translate`, so what passes here
passes there. Translation stops at the first error; to report every error, the objects
are translated as one set (cross-object checks such as an address claimed twice need the
whole set), the object an error names is set aside, and the rest translated again until
nothing fails. Warnings are the controller's own log warnings, collected while translating.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ambimesh import output
from controller.sources.files import SourceError, config_files, load_file
from controller.translate import ConfigError, Settings, SourcedObject, translate

ERROR = "error"
WARNING = "warning"

DESCRIPTION = """\
Check configuration files the way the controller's YAML directory source reads them, and
translate them with the controller's own translation, without a controller.

Reports, each with its location (file#document: Kind namespace/name: field: problem):
  - files that cannot be read or parsed (YAML syntax errors with their line);
  - every object the controller would reject (wrong field types, bad durations, IPs,
    ports, modes, unknown fields, names defined twice, an address claimed by two objects);
  - risky settings the controller warns about (e.g. routes to hosts that are not Services
    of the mesh, targetPorts no pod declares, unimplemented fields that are ignored).
The controller stops at the first error; validate sets the failing object aside and
translates the rest again, so every object's first error is reported. A file that does
not parse contributes no objects, which can cause warnings about what it defines.
Exit status: 1 if there is any error, 0 otherwise (warnings alone do not fail)."""


@dataclass(frozen=True)
class Finding:
    level: str  # ERROR or WARNING
    file: str
    location: str  # file, file:line or file#document
    message: str  # everything after the location

    def line(self) -> str:
        return f"{self.location}: {self.message}" if self.message else self.location


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "validate",
        help="check configuration files (every error and risky setting, with its location)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-f",
        "--filename",
        dest="paths",
        action="append",
        type=Path,
        required=True,
        metavar="FILE|DIR",
        help="a YAML file, or a directory read as the controller reads it (repeatable)",
    )
    output.add_output_flag(p)
    p.add_argument("--trust-domain", default="cluster.local", help="as the controller's")
    p.add_argument("--root-namespace", default="istio-system", help="as the controller's")
    p.add_argument("--cluster-domain", default="cluster.local", help="as the controller's")


def run(args: argparse.Namespace) -> int:
    settings = Settings(args.trust_domain, args.root_namespace, args.cluster_domain)
    findings = validate(args.paths, settings)
    errors = sum(f.level == ERROR for f in findings)
    text = output.render(
        [asdict(f) for f in findings],
        args.output,
        lambda: "\n".join(f"{f.level.upper():<8}{f.line()}" for f in findings),
    )
    if text:  # a clean table is no lines, as before
        print(text)
    if args.output == "table":
        warnings = len(findings) - errors
        if errors:
            verdict = "fix the errors above: the controller would reject this configuration"
        else:
            verdict = "the controller would accept this configuration"
        print(f"{errors} error(s), {warnings} warning(s): {verdict}", file=sys.stderr)
    return 1 if errors else 0


def validate(paths: Sequence[Path], settings: Settings | None = None) -> list[Finding]:
    """Every error and warning for the files in ``paths``, errors first, in file order."""
    findings: list[Finding] = []
    files: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        try:
            found = config_files(path) if path.is_dir() else [path]
        except SourceError as e:
            findings.append(_finding(ERROR, str(e), [str(path)]))
            continue
        if not path.exists():
            findings.append(_finding(ERROR, f"{path}: no such file or directory", [str(path)]))
            continue
        for f in found:  # a file named twice (vt/a.yaml, ./vt/a.yaml) is read once
            if (real := f.resolve()) not in seen:
                seen.add(real)
                files.append(f)
    names = [str(f) for f in files]
    objects: list[SourcedObject] = []
    for path in files:
        try:
            objects += load_file(path)
        except SourceError as e:
            findings.append(_finding(ERROR, str(e), names))
    warnings: dict[str, None] = {}
    with _collect_warnings(warnings):
        while True:
            try:
                translate(objects, settings)
                break
            except ConfigError as e:
                message = str(e)
                source = _source_of(message, [o.source for o in objects])
                findings.append(_finding(ERROR, message, names))
                if source is None:  # names no object: nothing to set aside
                    break
                objects = [o for o in objects if o.source != source]
    findings += [_finding(WARNING, w, names) for w in warnings]
    order = {name: n for n, name in enumerate(names)}
    findings.sort(key=lambda f: (f.level != ERROR, order.get(f.file, -1)))
    return findings


def _source_of(message: str, sources: Sequence[str]) -> str | None:
    """The object source (``file#n``) ``message`` starts with, the longest if several."""
    matching = [s for s in set(sources) if message.startswith(f"{s}:")]
    return max(matching, key=len) if matching else None


def _finding(level: str, message: str, files: Sequence[str]) -> Finding:
    """Split ``message`` into the file it names, its location and the rest."""
    file = max((f for f in files if message.startswith(f)), key=len, default="")
    if not file:
        return Finding(level, "", "", message)
    end = message.find(": ", len(file))
    if end < 0:
        return Finding(level, file, message, "")
    return Finding(level, file, message[:end], message[end + 2 :])


class _Collector(logging.Handler):
    def __init__(self, into: dict[str, None]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into[record.getMessage()] = None


@contextmanager
def _collect_warnings(into: dict[str, None]) -> Iterator[None]:
    """The controller's log warnings go to ``into`` (deduplicated), not to stderr."""
    logger = logging.getLogger("controller")
    handler = _Collector(into)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(min(logger.getEffectiveLevel(), logging.WARNING))
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
