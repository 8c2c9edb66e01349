"""ISQ policies: which format each tensor of a model gets.

A ``Policy`` is a default format (or one of llama.cpp's mixes, see ``mixes``) plus ordered
rules; the first rule that matches a tensor picks its format, as llama-quantize's
``--tensor-type`` overrides do. Rules match by name (regex), role and layer::

    Policy(default="Q4_K", rules=[Rule("Q6_K", role="attn_v", layers="first 25%"),
                                  Rule("skip", name=r"ffn_down", layers=[0, -1])])
    Policy(mix="Q4_K_M", rules=[Rule("Q8_0", role="attn_v")])   # a llama.cpp mix with overrides

and from YAML (``configs/policies/*.yaml``, the same keys). ``plan(source)`` resolves a model's
tensors in llama.cpp's order (its counters depend on it), applies llama.cpp's fallback for rows
that do not divide into blocks, and checks every choice before any work starts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from jaxquant.errors import FormatError, PolicyError
from jaxquant.formats import PlainFormat, get_format, list_formats
from jaxquant.isq import mixes

SKIP = "skip"  # a rule format: keep the tensor as the source stores it
ROLES = ("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_kv_b", "attn_output", "ffn_gate",
         "ffn_up", "ffn_down", "other")
RULE_KEYS = ("format", "name", "role", "layers")
POLICY_KEYS = ("name", "default", "mix", "pure", "embeddings", "output", "promote", "fallback", "check", "rules")
LAYER_FORMS = ("an index (3, -1)", "an inclusive range '2-5'", "a slice '10:' or '-4:'", "'first 25%'", "'last 25%'",
               "'middle 50%'", "'first 4'", "'last 4'", "a list of these")
POLICY_DIR = Path(__file__).resolve().parents[2] / "configs" / "policies"


class PolicyWarning(UserWarning):
    """A policy that applies but probably not as meant (a rule that matches nothing)."""


def _format_name(name: str, where: str) -> str:
    """A quantizable format's canonical name, or SKIP."""
    if str(name).lower() == SKIP:
        return SKIP
    try:
        fmt = get_format(name)
    except FormatError:
        raise PolicyError(f"{where}: unknown format {name!r}; valid: {', '.join(list_formats(True))} "
                          f"or {SKIP!r}") from None
    if not fmt.can_quantize:
        raise PolicyError(f"{where}: jaxquant can load {fmt.name} but not quantize to it; valid: "
                          f"{', '.join(list_formats(True))} or {SKIP!r}")
    return fmt.name


# ---- layers -------------------------------------------------------------------------------------

_PATTERNS = (("index", re.compile(r"^(-?\d+)$")), ("range", re.compile(r"^(\d+)\s*-\s*(\d+)$")),
             ("slice", re.compile(r"^(-?\d*)\s*:\s*(-?\d*)$")),
             ("fraction", re.compile(r"^(first|last|middle)\s+(\d+(?:\.\d+)?)\s*%$")),
             ("count", re.compile(r"^(first|last)\s+(\d+)$")))


@dataclasses.dataclass(frozen=True)
class Layers:
    """A set of layers, resolved against a model's layer count ``n``. Fractions count
    ``round(n * P / 100)`` layers (halves up); 'middle P%' is what the first and last
    ``(100 - P) / 2`` % leave, so 'first 25%', 'middle 50%' and 'last 25%' split a model exactly."""

    text: str
    parts: tuple[tuple[str, Any, Any], ...]

    @classmethod
    def parse(cls, spec: int | str | Sequence[int | str], where: str = "layers") -> Layers:
        items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
        if not items:
            raise PolicyError(f"{where}: empty layer list; use {', '.join(LAYER_FORMS)}")
        parts = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise PolicyError(f"{where}: {item!r} is not a layer spec; use {', '.join(LAYER_FORMS)}")
            text = str(item).strip().lower()
            for kind, pattern in _PATTERNS:
                m = pattern.match(text)
                if m:
                    break
            else:
                raise PolicyError(f"{where}: cannot read layer spec {item!r}; use {', '.join(LAYER_FORMS)}")
            if kind == "index":
                parts.append((kind, int(m.group(1)), None))
            elif kind == "range":
                parts.append((kind, int(m.group(1)), int(m.group(2))))
            elif kind == "slice":
                parts.append((kind, int(m.group(1)) if m.group(1) else None, int(m.group(2)) if m.group(2) else None))
            else:
                value = float(m.group(2))
                if kind == "fraction" and not 0 < value <= 100:
                    raise PolicyError(f"{where}: {item!r}: the percentage must be in (0, 100]")
                parts.append((m.group(1) + ("%" if kind == "fraction" else ""), value, None))
        return cls(", ".join(str(i) for i in items), tuple(parts))

    def indices(self, n: int) -> set[int]:
        """The layers of an ``n``-layer model this spec names."""
        def count(percent: float) -> int:
            return math.floor(n * percent / 100 + 0.5)

        out: set[int] = set()
        for kind, a, b in self.parts:
            if kind == "index":
                out |= {a + n if a < 0 else a} & set(range(n))
            elif kind == "range":
                out |= set(range(a, min(b, n - 1) + 1))
            elif kind == "slice":
                out |= set(range(n)[slice(a, b)])
            elif kind in ("first", "first%"):
                out |= set(range(min(n, count(a) if kind == "first%" else int(a))))
            elif kind in ("last", "last%"):
                out |= set(range(max(0, n - (count(a) if kind == "last%" else int(a))), n))
            else:  # middle%
                edge = count((100 - a) / 2)
                out |= set(range(edge, n - edge))
        return out


# ---- rules and policies -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
    """Tensors matching every given criterion get ``format`` (a format name or ``"skip"``: keep
    the tensor as stored). ``name``: a regex searched in the tensor name; ``role``: one or more
    of ``ROLES`` (llama.cpp's tensor categories); ``layers``: see ``Layers``."""

    format: str
    name: str | None = None
    role: str | Sequence[str] | None = None
    layers: int | str | Sequence[int | str] | Layers | None = None

    def __post_init__(self):
        where = f"rule {self.describe()}"
        object.__setattr__(self, "format", _format_name(self.format, where))
        if self.name is not None:
            try:
                re.compile(self.name)
            except (re.error, TypeError) as e:
                raise PolicyError(f"{where}: bad regex {self.name!r}: {e}; write a Python regular expression "
                                  r"searched in the tensor name, e.g. 'blk\.[0-3]\.ffn_down'") from None
        if self.role is not None:
            roles = (self.role,) if isinstance(self.role, str) else tuple(self.role)
            bad = [r for r in roles if r not in ROLES]
            if bad or not roles:
                raise PolicyError(f"{where}: unknown role {bad[0] if bad else roles!r}; valid: {', '.join(ROLES)}")
            object.__setattr__(self, "role", roles)
        if self.layers is not None and not isinstance(self.layers, Layers):
            object.__setattr__(self, "layers", Layers.parse(self.layers, where))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "rule") -> Rule:
        if not isinstance(d, Mapping):
            raise PolicyError(f"{where}: expected a mapping with keys {', '.join(RULE_KEYS)}, got {d!r}")
        bad = [k for k in d if k not in RULE_KEYS]
        if bad:
            raise PolicyError(f"{where}: unknown key {bad[0]!r}; valid: {', '.join(RULE_KEYS)}")
        if "format" not in d:
            raise PolicyError(f"{where}: missing 'format' (a format name or {SKIP!r})")
        return cls(**d)

    def matches(self, name: str, role: str, layer: int | None, n_layers: int) -> bool:
        if self.name is not None and not re.search(self.name, name):
            return False
        if self.role is not None and role not in self.role:
            return False
        return self.layers is None or (layer is not None and layer in self.layers.indices(n_layers))

    def describe(self) -> str:
        role = ",".join(self.role) if isinstance(self.role, (tuple, list)) else self.role
        layers = self.layers.text if isinstance(self.layers, Layers) else self.layers
        crit = [f"{k}={v}" for k, v in (("name", self.name), ("role", role), ("layers", layers)) if v is not None]
        return f"{{{' '.join(crit) or 'every tensor'} -> {self.format}}}"


@dataclasses.dataclass(frozen=True)
class Policy:
    """What format each tensor gets.

    - ``default``: the format of tensors no rule matches; or ``mix``: one of llama.cpp's mixes
      (``mixes.FTYPES``), which decides those tensors as llama-quantize does (``pure``: every
      tensor the mix's default type, as ``llama-quantize --pure``).
    - ``rules``: ordered ``Rule``s; the first match wins (llama-quantize's ``--tensor-type``).
    - ``embeddings`` / ``output``: the token embeddings' / output's format, before any rule
      (``--token-embedding-type`` / ``--output-tensor-type``; tied embeddings follow ``output``).
    - ``promote``: without a mix, give the output (and tied embeddings) llama.cpp's type: Q6_K,
      or Q8_0 where the row does not divide into the default's blocks.
    - ``fallback``: llama.cpp's smaller-block type for rows that do not divide into blocks
      (Q4_K -> Q5_0, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL, ...); off, such a tensor is an error.
    - ``check``: a tensor whose quantized values are non-finite or whose error is 100% (values
      out of the format's range) is an error (``jaxquant.quantize(check=...)``); off, it is kept.
    """

    default: str | None = None
    rules: tuple[Rule, ...] = ()
    mix: str | None = None
    pure: bool = False
    embeddings: str | None = None
    output: str | None = None
    promote: bool = False
    fallback: bool = True
    check: bool = True
    name: str = ""

    def __post_init__(self):
        where = _label(self)
        if self.mix is not None:
            object.__setattr__(self, "mix", _check_mix(self.mix, where))
            if self.default is not None:
                raise PolicyError(f"{where}: give a default format or a mix, not both (mix {self.mix} has the "
                                  f"default type {mixes.FTYPES[self.mix][1]})")
            if self.promote:
                raise PolicyError(f"{where}: 'promote' is for policies without a mix (a mix promotes as llama.cpp)")
        elif self.default is None:
            raise PolicyError(f"{where}: needs a default format or a mix (one of {', '.join(mixes.PRESETS)})")
        elif self.pure:
            raise PolicyError(f"{where}: 'pure' applies to a mix only")
        else:
            object.__setattr__(self, "default", _plain_or_quantized(self.default, f"{where}: default"))
        for key in ("embeddings", "output"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, _plain_or_quantized(getattr(self, key), f"{where}: {key}"))
        rules = tuple(r if isinstance(r, Rule) else Rule.from_dict(r, f"{where}: rule {i + 1}")
                      for i, r in enumerate(self.rules))
        object.__setattr__(self, "rules", rules)

    @property
    def default_type(self) -> str:
        return mixes.FTYPES[self.mix][1] if self.mix else self.default

    @property
    def ftype(self) -> int:
        """llama.cpp's ``general.file_type`` for a model made by this policy."""
        if self.mix:
            return mixes.FTYPES[self.mix][0]
        return mixes.GUESSED_FTYPES.get(self.default, 0)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "policy") -> Policy:
        if not isinstance(d, Mapping):
            raise PolicyError(f"{where}: expected a mapping with keys {', '.join(POLICY_KEYS)}")
        bad = [k for k in d if k not in POLICY_KEYS]
        if bad:
            raise PolicyError(f"{where}: unknown key {bad[0]!r}; valid: {', '.join(POLICY_KEYS)}")
        rules = d.get("rules") or ()
        if not isinstance(rules, (list, tuple)):
            raise PolicyError(f"{where}: 'rules' must be a list of rules (mappings with keys {', '.join(RULE_KEYS)})")
        values = {**d, "rules": tuple(Rule.from_dict(r, f"{where}: rule {i + 1}") for i, r in enumerate(rules))}
        for key in ("pure", "promote", "fallback", "check"):
            if key in values and not isinstance(values[key], bool):
                raise PolicyError(f"{where}: {key!r} must be true or false, got {values[key]!r}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Policy:
        import yaml

        path = Path(path)
        try:
            d = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise PolicyError(f"{path}: cannot read ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise PolicyError(f"{path}: invalid YAML: {e}") from None
        d = dict(d) if isinstance(d, Mapping) else d
        if isinstance(d, dict):
            d.setdefault("name", path.stem)
        return cls.from_dict(d, str(path))

    def plan(self, source, has_imatrix: bool = False, check: bool = True) -> Plan:
        """Each tensor's format for ``source`` (an opened model), in llama.cpp's order (some mixes
        change when an imatrix is given); warns for rules that match nothing. ``check``: fail
        (before any work) when a format cannot apply to a tensor; off, the plan is a dry run that
        may name formats jaxquant cannot quantize."""
        plan = _plan(self, source, has_imatrix)
        if check:
            _check(plan)
            needs = plan.needs_imatrix
            if needs is not None:  # llama-quantize's refusal, before any work
                raise PolicyError(f"{_label(self)}: this quantization requires an importance matrix! offending "
                                  f"tensor: {needs.name}, target type: {needs.format} ({needs.reason}); make one "
                                  "with `jaxquant imatrix` and pass it with --imatrix")
        return plan

    def explain(self, source, has_imatrix: bool = False, file: TextIO | None = None) -> Plan:
        """Print each tensor's format and what chose it (a dry run: a plan that needs an imatrix
        it was not given says so); returns the plan."""
        plan = _plan(self, source, has_imatrix)
        _check(plan)
        print(plan.explain(), file=file or sys.stdout)
        return plan


def _check_mix(name: str, where: str) -> str:
    try:
        return mixes.check_mix(name)
    except FormatError as e:
        raise PolicyError(f"{where}: {e}") from None


def _plain_or_quantized(name: str, where: str) -> str:
    fmt = _format_name(name, where)
    if fmt == SKIP:
        raise PolicyError(f"{where}: {SKIP!r} is a rule format; name a format here")
    return fmt


def preset(mix: str, pure: bool = False) -> Policy:
    """llama-quantize's mix ``mix`` (``mixes.PRESETS``), optionally ``--pure``."""
    mix = _check_mix(mix, "preset")
    return Policy(mix=mix, pure=pure, name=f"{mix}{' (pure)' if pure else ''}")


def load_policy(spec: str | Path | Policy, pure: bool = False) -> Policy:
    """A Policy from itself, a mix name ('Q4_K_M'), a YAML file, or the name of one in
    ``configs/policies`` ('dynamic-gate')."""
    if isinstance(spec, Policy):
        return dataclasses.replace(spec, pure=True) if pure else spec
    text = str(spec)
    if text.upper() in mixes.FTYPES:
        return preset(text, pure)
    for path in (Path(text), POLICY_DIR / text, POLICY_DIR / f"{text}.yaml"):
        if path.is_file():
            return load_policy(Policy.from_yaml(path), pure)
    named = sorted(p.stem for p in POLICY_DIR.glob("*.yaml")) if POLICY_DIR.is_dir() else []
    raise PolicyError(f"unknown policy {text!r}: not a mix ({', '.join(mixes.PRESETS)}), a YAML file, or a "
                      f"policy in {POLICY_DIR} ({', '.join(named) or 'none'})")


# ---- plans --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Choice:
    """One tensor's fate: ``format`` (== ``source_type`` when the tensor is kept as stored) and
    why (``reason``; ``rule``: the index of the rule that chose it)."""

    name: str
    shape: tuple[int, ...]
    source_type: str
    format: str
    reason: str
    rule: int | None = None

    @property
    def requantize(self) -> bool:
        return self.format != self.source_type

    @property
    def nbytes(self) -> int:
        return get_format(self.format).nbytes(self.shape)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A policy resolved for one model: a ``Choice`` per tensor, in llama.cpp's tensor order."""

    policy: Policy
    model: mixes.ModelInfo
    choices: tuple[Choice, ...]
    has_imatrix: bool = False

    def __getitem__(self, name: str) -> Choice:
        return self._by_name[name]

    @functools.cached_property
    def _by_name(self) -> dict[str, Choice]:
        return {c.name: c for c in self.choices}

    @property
    def types(self) -> dict[str, str]:
        return {c.name: c.format for c in self.choices}

    @property
    def needs_imatrix(self) -> Choice | None:
        """Without an imatrix, the first tensor whose type needs one (llama.cpp's
        tensor_requires_imatrix), else None."""
        if self.has_imatrix:
            return None
        return next((c for c in self.choices if c.requantize
                     and mixes.requires_imatrix(c.name, c.format, self.policy.mix)), None)

    def explain(self) -> str:
        """A table: tensor, shape, source type -> format, and the reason."""
        p = self.policy
        what = f"llama.cpp mix {p.mix}{' (pure)' if p.pure else ''}" if p.mix else f"default {p.default}"
        lines = [f"policy {p.name or what}: {what}, {len(p.rules)} rule(s); model {self.model.arch}, "
                 f"{self.model.n_layers} layers, GQA {self.model.n_gqa}, imatrix {'yes' if self.has_imatrix else 'no'}"]
        for i, rule in enumerate(p.rules):
            lines.append(f"  rule {i + 1}: {rule.describe()}")
        width = max([len(c.name) for c in self.choices] + [6])
        lines.append(f"{'tensor':<{width}}  {'shape':<16} {'source':<7}    {'format':<7} why")
        for c in self.choices:
            lines.append(f"{c.name:<{width}}  {str(list(c.shape)):<16} {c.source_type:<7} -> {c.format:<7} {c.reason}")
        size = sum(math.prod(c.shape) for c in self.choices)
        nbytes = sum(c.nbytes for c in self.choices)
        counts: dict[str, int] = {}
        for c in self.choices:
            counts[c.format] = counts.get(c.format, 0) + 1
        lines.append(f"{len(self.choices)} tensors ({', '.join(f'{n} {t}' for t, n in sorted(counts.items()))}): "
                     f"{nbytes / 2**20:.2f} MiB, {8 * nbytes / max(size, 1):.4f} bits per weight")
        if self.needs_imatrix is not None:
            c = self.needs_imatrix
            lines.append(f"this quantization requires an imatrix (first: {c.name}, {c.format}); none was given")
        return "\n".join(lines)


def _plan(policy: Policy, source, has_imatrix: bool) -> Plan:
    model = mixes.ModelInfo.from_source(source)
    names = mixes.tensor_order(source.tensor_names)
    state = mixes.MixState.start(model, names, has_imatrix)
    default = policy.default_type
    default_quantized = not isinstance(get_format(default), PlainFormat)
    hits = [0] * len(policy.rules)  # tensors each rule matches / chooses
    chosen = [0] * len(policy.rules)
    choices = []
    for name in names:
        info = source.info(name)
        shape, cat, layer = tuple(info.shape), mixes.category(name), mixes.layer_of(name)
        if not mixes.allows_quantization(name, len(shape), model.arch):
            choices.append(Choice(name, shape, info.type, info.type, "kept: never quantized (" + _why_kept(name, shape)
                                  + ")"))
            continue
        matching = [i for i, r in enumerate(policy.rules) if r.matches(name, cat, layer, model.n_layers)]
        for i in matching:
            hits[i] += 1
        rule = matching[0] if matching else None
        fmt, why, by_rule = _choose(policy, state, default, default_quantized, name, shape, cat, rule)
        if by_rule:
            chosen[rule] += 1
        if fmt == SKIP:
            fmt = info.type
        choices.append(Choice(name, shape, info.type, fmt, why, rule if by_rule else None))
    _warn_unused(policy, model, hits, chosen)
    return Plan(policy, model, tuple(choices), has_imatrix)


def _choose(policy: Policy, state: mixes.MixState, default: str, default_quantized: bool, name: str,
            shape: tuple[int, ...], cat: str, rule: int | None) -> tuple[str, str, bool]:
    """llama_tensor_get_type with our rules as its ``--tensor-type`` overrides: (format, reason,
    whether the rule chose it)."""
    tied_embd = cat == "token_embd" and state.has_tied_embeddings
    if policy.embeddings and cat == "token_embd" and not (name == "per_layer_token_embd.weight" and rule is not None):
        return policy.embeddings, "the policy's embeddings format", False
    if policy.output and (cat == "output" or (tied_embd and not policy.mix)):
        return policy.output, "the policy's output format", False
    if rule is not None:
        fmt, why = policy.rules[rule].format, f"rule {rule + 1} {policy.rules[rule].describe()}"
        if fmt == SKIP:
            return SKIP, f"rule {rule + 1} {policy.rules[rule].describe()}: kept as stored", True
    elif policy.mix and not policy.pure and default_quantized:
        fmt, why = mixes.mix_type(state, default, name, shape, policy.mix, cat, policy.output)
        why = f"{policy.mix}: {why}"
    elif policy.promote and (cat == "output" or tied_embd):
        fmt, why = mixes.mix_type(state, default, name, shape, "", cat)
        why = f"promoted {why}"
    else:
        fmt, why = default, "the default" + (" (pure)" if policy.pure else "")
    if policy.fallback and (default_quantized or rule is not None):
        try:
            fmt, note = mixes.fallback(fmt, shape[-1])
        except FormatError as e:
            raise PolicyError(f"tensor {name!r} {list(shape)}: {e}") from None
        if note:
            why = f"{why}; fallback: {note}"
    return fmt, why, rule is not None


def _why_kept(name: str, shape: tuple[int, ...]) -> str:
    if len(shape) < 2:
        return f"{len(shape)}-D"
    return "norm" if "_norm.weight" in name else "llama.cpp keeps it"


def _warn_unused(policy: Policy, model: mixes.ModelInfo, hits: list[int], chosen: list[int]) -> None:
    for i, rule in enumerate(policy.rules):
        if not hits[i]:
            warnings.warn(f"{_label(policy)}: rule {i + 1} {rule.describe()} matches no quantizable "
                          f"tensor of this {model.arch} model ({model.n_layers} layers)", PolicyWarning, stacklevel=4)
        elif not chosen[i]:
            warnings.warn(f"{_label(policy)}: rule {i + 1} {rule.describe()} never applies: the "
                          f"{hits[i]} tensor(s) it matches are taken by earlier rules or by the "
                          "embeddings/output settings", PolicyWarning, stacklevel=4)


def _label(policy: Policy) -> str:
    return f"policy {policy.name!r}" if policy.name else "policy"


def _check(plan: Plan) -> None:
    """Every requantized tensor's format must exist, be quantizable and fit its rows."""
    problems, hints = [], []
    for c in plan.choices:
        if not c.requantize:
            continue
        try:
            get_format(c.source_type)
        except FormatError:
            problems.append(f"tensor {c.name!r}: its type {c.source_type} cannot be loaded, so not requantized")
            continue
        fmt = get_format(c.format)
        if not fmt.can_quantize:
            problems.append(f"tensor {c.name!r}: jaxquant cannot quantize to {c.format} (it can load it) ({c.reason})")
            hints = [f"quantizable formats: {', '.join(list_formats(True))}"]
        elif c.shape[-1] % fmt.block_size:
            problems.append(f"tensor {c.name!r} {list(c.shape)}: {c.format} needs a row length that is a multiple of "
                            f"{fmt.block_size}, this one is {c.shape[-1]} ({c.reason})")
    if problems:
        more = [f"... and {len(problems) - 5} more"] if len(problems) > 5 else []
        hint = "" if plan.policy.fallback else " (fallback is off: turn it on to get llama.cpp's smaller-block types)"
        raise PolicyError(f"{_label(plan.policy)} cannot apply{hint}:\n  " + "\n  ".join(problems[:5] + more + hints))
