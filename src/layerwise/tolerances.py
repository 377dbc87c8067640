"""Which errors are acceptable: dtype-scaled defaults, global limits and per-tensor rules.

A tensor is judged by ONE set of checks, the first that exists of:
  1. the last `--tolerance` rule whose pattern matches its name (command-line order),
  2. else the last matching rule of the tolerance file (file order),
  3. else the global limits (`--rtol/--atol`, `--max-rel-l2`, `--min-cosine`, `--max-abs`,
     `--max-kl`), if any was given,
  4. else the default of the looser dtype involved (DEFAULT_REL_L2 below).
A check on a metric the tensor does not have is skipped: expert ids have no rel_l2, hidden
states no routing agreement, only logits have KL. Rules that name none of a tensor's metrics do
not match it. `judge` says why one prompt's tensor breaks its checks. Pure, except
`load_tolerance_file`. docs/COMPARE.md explains the defaults.
"""

from __future__ import annotations

import fnmatch
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .schema import is_number, read_table_file

if TYPE_CHECKING:
    from .metrics import LogitsMetrics, TensorMetrics
    from .routing import RoutingMetrics

# Largest relative L2 error (||a - b|| / ||a||) accepted by default, per dtype class. Mixed
# comparisons take the looser class of the two runs' compute dtypes and the tensors' dtypes.
DEFAULT_REL_L2 = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2, "fp8": 2.5e-1}
_LOOSENESS = ["fp32", "fp16", "bf16", "fp8"]
_DTYPE_CLASS = {
    "float64": "fp32", "fp64": "fp32", "double": "fp32", "float32": "fp32", "fp32": "fp32", "float": "fp32",
    "tf32": "fp16", "float16": "fp16", "fp16": "fp16", "half": "fp16", "bfloat16": "bf16", "bf16": "bf16",
    "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "float8_e4m3fnuz": "fp8", "float8_e5m2fnuz": "fp8", "fp8": "fp8",
}
DTYPE_NAMES = frozenset(_DTYPE_CLASS)  # the compute dtypes a run's settings.dtype may name (schema.check_manifest)
# Margin of a near-tie between router scores s = sigmoid(logit), per dtype class: about twice the
# score change the class's rounding causes (bf16: ~2^-8 relative error on logits of a few units).
DEFAULT_TIE = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 1e-2, "fp8": 5e-2}
# Routing: a flip no shared selection rule explains is a bug whatever the dtype.
DEFAULT_ROUTING = "flips_inconsistent<=0"

# metric -> (family, direction): "max" metrics must stay below a limit, "min" metrics above.
METRICS = {
    "max_abs": ("tensor", "max"), "mean_abs": ("tensor", "max"), "rel_l2": ("tensor", "max"),
    "cosine": ("tensor", "min"), "sqnr_db": ("tensor", "min"),
    "kl": ("logits", "max"), "kl_max": ("logits", "max"), "top1": ("logits", "min"), "topk": ("logits", "min"),
    "same_set": ("routing", "min"), "jaccard": ("routing", "min"), "flips": ("routing", "max"),
    "flips_moved": ("routing", "max"), "flips_inconsistent": ("routing", "max"),
}
# Which families a kind of tensor has: hidden states and router logits, logits, expert ids.
KIND_FAMILIES = {"tensor": {"tensor"}, "logits": {"tensor", "logits"}, "routing": {"routing"}}
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_CHECK = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=|<|>|=)\s*([^\s,]+)\s*$")
# The values each metric can take (low, high); the others are errors, KL divergences and counts: 0 up.
_RANGES = {"cosine": (-1.0, 1.0), "sqnr_db": (-math.inf, math.inf), "top1": (0.0, 1.0), "topk": (0.0, 1.0),
           "same_set": (0.0, 1.0), "jaccard": (0.0, 1.0)}
_EXAMPLE = "e.g. 'model.layers.*:output=rel_l2<3e-2' or 'lm_head:output=kl<1e-3,top1>=0.99'"


@dataclass(frozen=True)
class Check:
    metric: str
    op: str
    limit: float

    def holds(self, value: float) -> bool:
        """NaN never holds."""
        return _OPS[self.op](value, self.limit)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.limit:g}"


@dataclass(frozen=True)
class Tolerance:
    """The checks one tensor is judged by, and where they came from."""
    checks: tuple[Check, ...] = ()
    rtol: float | None = None  # allclose: every |a - b| <= atol + rtol |a|
    atol: float | None = None
    source: str = "default"

    @property
    def allclose(self) -> bool:
        return self.rtol is not None or self.atol is not None

    def __str__(self) -> str:
        parts = [str(c) for c in self.checks]
        if self.allclose:
            parts.append(f"allclose(rtol={self.rtol or 0:g},atol={self.atol or 0:g})")
        return ",".join(parts) or "none"


@dataclass(frozen=True)
class Rule:
    pattern: str
    tolerance: Tolerance
    text: str

    def matches(self, name: str, kind: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern) and _applies(self.tolerance, kind)


@dataclass(frozen=True)
class Tolerances:
    """Everything that decides pass or fail; `CompareOptions.tolerances`."""
    rules: tuple[Rule, ...] = ()  # --tolerance rules, in order (last match wins)
    file_rules: tuple[Rule, ...] = ()  # rules from --tolerance-file, in order (last match wins)
    rtol: float | None = None
    atol: float | None = None
    max_rel_l2: float | None = None
    min_cosine: float | None = None
    max_abs: float | None = None
    max_kl: float | None = None

    def resolve(self, name: str, kind: str, dtypes: tuple[str | None, ...]) -> Tolerance:
        """The checks for tensor `name` of `kind` ("tensor", "logits", "routing"); `dtypes`
        are the dtypes involved (runs' compute dtypes, tensors' dtypes) for the default."""
        for rules in (self.rules, self.file_rules):
            for rule in reversed(rules):
                if rule.matches(name, kind):
                    return _restrict(rule.tolerance, kind)
        glob = self._global()
        if glob is not None and _applies(glob, kind):
            return _restrict(glob, kind)
        return default_tolerance(kind, dtypes)

    def unmatched(self, tensors) -> tuple[Rule, ...]:
        """The rules that judge none of `tensors` ((name, kind) pairs): a misspelt pattern, or a
        rule for tensors these runs do not hold."""
        tensors = list(tensors)
        return tuple(r for r in (*self.rules, *self.file_rules) if not any(r.matches(n, k) for n, k in tensors))

    def _global(self) -> Tolerance | None:
        checks = []
        for metric, op, value in (("rel_l2", "<=", self.max_rel_l2), ("cosine", ">=", self.min_cosine),
                                  ("max_abs", "<=", self.max_abs), ("kl", "<=", self.max_kl)):
            if value is not None:
                checks.append(Check(metric, op, float(value)))
        if not checks and self.rtol is None and self.atol is None:
            return None
        rtol, atol = self.rtol, self.atol
        if (rtol is None) != (atol is None):  # one given: the other is 0, as in allclose
            rtol, atol = rtol or 0.0, atol or 0.0
        return Tolerance(tuple(checks), rtol, atol, source="global limits")


def dtype_class(dtypes: tuple[str | None, ...]) -> str:
    """The loosest dtype class among `dtypes` (unknown and integer dtypes are ignored)."""
    classes = [_DTYPE_CLASS.get(str(d).removeprefix("torch.").lower()) for d in dtypes if d]
    classes = [c for c in classes if c]
    return max(classes, key=_LOOSENESS.index) if classes else "fp32"


def default_tolerance(kind: str, dtypes: tuple[str | None, ...]) -> Tolerance:
    if kind == "routing":
        return Tolerance(_parse_checks(DEFAULT_ROUTING, DEFAULT_ROUTING)[0], source="default")
    cls = dtype_class(dtypes)
    return Tolerance((Check("rel_l2", "<=", DEFAULT_REL_L2[cls]),), source=f"{cls} default")


def _applies(tol: Tolerance, kind: str) -> bool:
    families = KIND_FAMILIES[kind]
    return any(METRICS[c.metric][0] in families for c in tol.checks) or (tol.allclose and "tensor" in families)


def _restrict(tol: Tolerance, kind: str) -> Tolerance:
    """Drop the checks on metrics a tensor of this kind does not have."""
    families = KIND_FAMILIES[kind]
    checks = tuple(c for c in tol.checks if METRICS[c.metric][0] in families)
    keep_allclose = "tensor" in families
    return Tolerance(checks, tol.rtol if keep_allclose else None, tol.atol if keep_allclose else None, tol.source)


# -------------------------------------------------------------------------------------- judging

def _fmt(value: float) -> str:
    return f"{value:.3g}"


def judge(tol: Tolerance, tm: TensorMetrics | None, lm: LogitsMetrics | None, rm: RoutingMetrics | None,
          floor: TensorMetrics | None, noise_factor: float) -> tuple[str, ...]:
    """The reasons one prompt's tensor breaks `tol` (empty: it passes). `floor` is the baseline's
    metrics against the reference: a tensor within `noise_factor` noise floors passes, unless
    NaN/Inf differ (never forgiven)."""
    values: dict[str, float | None] = {}
    if tm is not None:
        values.update(max_abs=tm.max_abs, mean_abs=tm.mean_abs, rel_l2=tm.rel_l2, cosine=tm.cosine, sqnr_db=tm.sqnr_db)
    if lm is not None:
        values.update(kl=lm.kl_mean, kl_max=lm.kl_max, top1=lm.top1, topk=lm.topk)
    if rm is not None:
        values.update(same_set=rm.same_set, jaccard=rm.jaccard, flips=rm.flips, flips_moved=rm.flips_moved,
                      flips_inconsistent=rm.flips_inconsistent)
    broken = [f"{c.metric} {_fmt(values[c.metric])} breaks {c}" for c in tol.checks
              if values.get(c.metric) is not None and not c.holds(values[c.metric])]
    if tm is not None and tm.violations:
        broken.append(f"{tm.violations} elements break allclose(rtol={tol.rtol:g},atol={tol.atol:g})")
    if broken and tm is not None and floor is not None and floor.rel_l2 > 0 \
            and tm.rel_l2 <= noise_factor * floor.rel_l2:
        broken = []  # no worse than the reference against itself: within the noise floor
    if tm is not None and tm.nonfinite_mismatch:  # never forgiven
        broken.insert(0, f"{tm.nonfinite_mismatch} NaN/Inf where the other run differs")
    return tuple(broken)


# -------------------------------------------------------------------------------------- parsing

def _bad(text: str, why: str) -> UserError:
    return UserError(f"cannot parse tolerance rule {text!r}: {why}; write PATTERN=CHECK[,CHECK...], {_EXAMPLE}")


def _number(text: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise _bad(text, f"{raw!r} is not a number") from None
    if math.isnan(value):
        raise _bad(text, "a limit cannot be NaN")
    return value


def metric_range(metric: str) -> tuple[float, float]:
    """The values `metric` can take: cosine -1 to 1, agreements and Jaccard 0 to 1, sqnr_db any,
    errors, KL divergences and flip counts 0 up."""
    return _RANGES.get(metric, (0.0, math.inf))


def _span(metric: str) -> str:
    low, high = metric_range(metric)
    if low == -math.inf:
        return "any number"
    return f"from {low:g} to {high:g}" if high < math.inf else f"from {low:g} up"


def check_limit(metric: str, op: str, value: float, where: str) -> None:
    """A limit outside what `metric` can take, or on its edge with a strict comparison, either
    can never hold (every run fails) or always holds (nothing is checked): refused, naming `where`."""
    low, high = metric_range(metric)
    if op in (">", ">="):  # a lower limit
        never, always = value > high or (op == ">" and value == high), value < low
    else:
        never, always = value < low or (op == "<" and value == low), value > high
    if never or always:
        fate = "can never hold" if never else "always holds"
        raise UserError(f"{where}: {metric} lies {_span(metric)}, so {metric}{op}{value:g} {fate}: "
                        f"give a limit {_span(metric)}")


def _parse_checks(body: str, text: str, source: str = "--tolerance") -> tuple[tuple[Check, ...], float | None,
                                                                              float | None]:
    checks: list[Check] = []
    rtol = atol = None
    for part in body.split(","):
        match = _CHECK.match(part)
        if not match:
            raise _bad(text, f"{part.strip()!r} is not METRIC<LIMIT")
        metric, op, raw = match.groups()
        value = _number(text, raw)
        if metric in ("rtol", "atol"):
            if op != "=":
                raise _bad(text, f"write {metric}={raw}")
            if value < 0:
                raise _bad(text, f"{metric} cannot be negative")
            rtol, atol = (value, atol) if metric == "rtol" else (rtol, value)
            continue
        if metric not in METRICS:
            known = ", ".join(list(METRICS) + ["rtol", "atol"])
            raise _bad(text, f"unknown metric {metric!r} (known: {known})")
        direction = METRICS[metric][1]
        if op == "=" or (direction == "max") != (op in ("<", "<=")):
            want = "<" if direction == "max" else ">"
            bound = "an upper" if direction == "max" else "a lower"
            raise _bad(text, f"{metric} needs {bound} limit: {metric}{want}{raw}")
        check_limit(metric, op, value, f"tolerance rule {text!r} ({source})")
        checks.append(Check(metric, op, value))
    if rtol is not None or atol is not None:
        rtol, atol = rtol or 0.0, atol or 0.0
    return tuple(checks), rtol, atol


def parse_rule(text: str, source: str = "--tolerance") -> Rule:
    """`PATTERN=CHECK[,CHECK...]`: PATTERN is a glob over tensor names (`*` crosses dots),
    CHECK is `metric<limit`, `metric<=limit`, `metric>limit`, `metric>=limit`, `rtol=x`, `atol=x`."""
    pattern, sep, body = text.partition("=")
    if not sep or not pattern.strip() or not body.strip():
        raise _bad(text, "expected PATTERN=CHECK")
    if pattern.rstrip()[-1:] in "<>":  # "rel_l2<=3" without a pattern
        raise _bad(text, "the rule has no tensor name pattern before '='")
    checks, rtol, atol = _parse_checks(body, text, source)
    return Rule(pattern.strip(), Tolerance(checks, rtol, atol, source=f"{source} {text!r}"), text)


# The global limits, and the check each is (rtol and atol: allclose's terms, 0 up).
_GLOBAL_CHECKS = {"rtol": None, "atol": None, "max_rel_l2": ("rel_l2", "<="), "min_cosine": ("cosine", ">="),
                  "max_abs": ("max_abs", "<="), "max_kl": ("kl", "<=")}
_GLOBAL_KEYS = tuple(_GLOBAL_CHECKS)


def _check_global(key: str, value: float, where: str) -> None:
    if math.isnan(value):
        raise UserError(f"{where} cannot be NaN (a NaN limit fails every tensor, the reference's own too)")
    metric, op = _GLOBAL_CHECKS[key] or (key, None)
    if op is None:
        if value < 0:
            raise UserError(f"{where} cannot be negative (got {value:g}): give a number from 0 up")
        return
    check_limit(metric, op, value, where)


def load_tolerance_file(path: str | Path) -> tuple[dict, tuple[Rule, ...]]:
    """Read a TOML (Python 3.11+) or JSON tolerance file:

        max_rel_l2 = 1e-2                        # any global limit: rtol atol max_rel_l2 ...
        [rules]                                  # pattern = "checks", later rules win
        "model.layers.*:output" = "rel_l2<3e-2"
        "lm_head:output" = "kl<1e-3, top1>=0.99"

    JSON: {"max_rel_l2": 1e-2, "rules": {"model.layers.*:output": "rel_l2<3e-2"}}.
    Returns (global limits, rules)."""
    path = Path(path)
    data = read_table_file(path, "tolerance file")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a table of global limits and [rules]")
    unknown = sorted(set(data) - set(_GLOBAL_KEYS) - {"rules"})
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(_GLOBAL_KEYS)}, rules)")
    limits = {}
    for key in _GLOBAL_KEYS:
        if key in data:
            if not is_number(data[key]):
                raise UserError(f"{path}: {key} must be a finite number, not {data[key]!r}")
            limits[key] = float(data[key])
            _check_global(key, limits[key], f"{path}: {key} = {data[key]!r}")
    rules = data.get("rules", {})
    if not isinstance(rules, dict) or not all(isinstance(v, str) for v in rules.values()):
        raise UserError(f'{path}: rules must map a pattern to a string of checks, e.g. "rel_l2<3e-2"')
    if not limits and not rules:  # a file that judges nothing would leave the defaults in force unsaid
        raise UserError(f"{path} holds no limits and no rules: add e.g. max_rel_l2 = 1e-2 or a [rules] table "
                        '("PATTERN" = "CHECKS"), or drop --tolerance-file')
    return limits, tuple(parse_rule(f"{pattern}={checks}", source=str(path)) for pattern, checks in rules.items())


def build_tolerances(rules: list[str] | tuple[str, ...] = (), file: str | Path | None = None, **limits) -> Tolerances:
    """Tolerances from command-line rules, a file and global limits (flags override the file)."""
    given = {k: v for k, v in limits.items() if v is not None}
    for key, value in given.items():
        if key not in _GLOBAL_KEYS:
            raise TypeError(f"unknown limit {key}")
        _check_global(key, value, f"--{key.replace('_', '-')} {value:g}")
    file_limits, file_rules = load_tolerance_file(file) if file else ({}, ())
    merged = {**file_limits, **given}
    return Tolerances(rules=tuple(parse_rule(r) for r in rules), file_rules=file_rules, **merged)
