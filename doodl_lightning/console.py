"""What a user sees: the library notices that do not concern a DOODL run, silenced at one place."""
from __future__ import annotations

import logging
import re
import warnings

# notices about set-ups a DOODL run has on purpose: one tick per step (no data loader), frozen models in
# eval mode, a CPU run on a machine with a GPU, checkpoints taken after the update (what resuming needs:
# tests/test_framework.py), and a torch-internal deprecation inside Lightning
IRRELEVANT_WARNINGS = (".*does not have many workers.*", ".*module\\(s\\) in eval mode.*", ".*LeafSpec.*",
                       ".*GPU available but not used.*", ".*ModelCheckpoint with manual optimization.*")


# Lightning's start-up lines that say nothing about a DOODL run: which accelerators the machine has (the
# config names the one used), adverts for Lightning's cloud products (litlogger, litmodels), and the global
# seed (a DOODL item's randomness comes from its own seed, so "Seed set to 0" beside seeds [3, 7] misleads)
IRRELEVANT_LOG_LINES = ("GPU available:", "TPU available:", "Tip: For seamless cloud", "Seed set to ")
# the loggers Lightning prints them through (rank_zero_info, and fabric's seed_everything)
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                          "lightning.fabric.utilities.seed")


class _DropIrrelevantLines(logging.Filter):
    """Drops the records whose message contains one of ``IRRELEVANT_LOG_LINES``; the other notices
    (why a fit stopped, which checkpoint a resume restores, ...) still print."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(line in message for line in IRRELEVANT_LOG_LINES)


_LINE_FILTER = _DropIrrelevantLines()


def silence_irrelevant() -> None:
    """Filter the warnings in ``IRRELEVANT_WARNINGS``, Lightning's start-up lines in ``IRRELEVANT_LOG_LINES``
    and the model-loading progress bars of diffusers and transformers (loading takes a second or two; the bars
    fill the screen before the first step). Safe to call more than once."""
    for pattern in IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", pattern)
    for name in LIGHTNING_INFO_LOGGERS:
        # a filter on the logger that emits them (not a level): the same loggers carry the notices that matter
        logger = logging.getLogger(name)
        if _LINE_FILTER not in logger.filters:
            logger.addFilter(_LINE_FILTER)
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


# what jsonargparse's nested Union messages wrap around the one line that says what is wrong
_PARSER_BOILERPLATE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value type:|Given value:|"
    r"Expected a <class 'NoneType'>|Expected a path but|Not a valid subclass of|Subclass types expect one of:|"
    r"a class path \(str\)|a dict with|a dict without)")
_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_CLASS = re.compile(r"^Problem with given class_path '([^']+)':$")


def condense_parser_error(message: str) -> str:
    """jsonargparse's error (9-17 lines of nested Union alternatives for a wrong value under ``model:``) as one line:
    the key's path, the problem and the fix, e.g. ``model.guidance (SymmetryGuidance) weight: expected a float, got
    'x': ...``. The first line that is neither a key, a class nor the Union boilerplate is the problem (the first
    alternative tried: the class the config names); the keys and classes above it make the path."""
    stack: list[tuple[int, str]] = []  # (indent, name) of the keys and classes the current line is under
    for raw in message.splitlines():
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip(" -"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        text = raw.strip().lstrip("- ")
        key, cls = _KEY.match(text), _CLASS.match(text)
        if key:
            stack.append((indent, key.group(1)))
            if not key.group(2):
                continue
            problem = key.group(2)
        elif cls:
            stack.append((indent, f"({cls.group(1).rsplit('.', 1)[-1]})"))
            continue
        elif _PARSER_BOILERPLATE.match(text):
            continue
        else:
            problem = text
        path = [name for _, name in stack if name != "(DOODL)"]  # model: is a DOODL unless it says otherwise
        where = ""
        for name in path:  # model.guidance (SymmetryGuidance) weight
            where += f" {name}" if name.startswith("(") or where.endswith(")") else f".{name}" if where else name
        return _parser_problem(where.strip(), problem)
    return " ".join(message.split())


def _parser_problem(where: str, problem: str) -> str:
    expected = re.match(r"Expected a <class '(\w+)'>\. Got value: (.*)$", problem)
    unknown = re.match(r"Option '([^']+)' is not accepted", problem)
    if expected:
        kind = expected.group(1)
        line = f"expected {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {expected.group(2)!r}: give one"
    elif unknown:
        line = f"unknown key {unknown.group(1)!r}: check its spelling"
    elif "has no attribute" in problem or "No module named" in problem:
        line = f"{problem}: check the class_path"
    else:
        line = problem
    prefix = f"{where}: " if where else ""
    return (f"{prefix}{line} (cli.py fit --help lists every key and its type; --verbose shows the parser's whole "
            f"message)")


def quiet_lightning() -> None:
    """``silence_irrelevant`` plus Lightning's start-up banners (for evaluation scripts that run many short
    fits; the CLI keeps Lightning's own output)."""
    silence_irrelevant()
    for name in ("lightning.pytorch", "lightning", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


# -- how items and guidance are named on screen, in TensorBoard and on the contact sheet ----------------
def item_label(prompt: str, seed: int, width: int = 60) -> str:
    """``prompt | seed N``, the prompt cut at ``width`` characters (whitespace runs and newlines made one
    space): what identifies an item to a reader, where an index would mean another item in another run."""
    text = " ".join(str(prompt).split())
    if len(text) > width:
        text = text[: width - 1].rstrip() + "…"
    return f"{text} | seed {seed}"


def item_labels(items, width: int = 60) -> list[str]:
    """``item_label`` of each item, made unique with `` #index`` where two items read the same (the same
    prompt and seed given twice, or prompts equal up to the cut): TensorBoard would merge their lines."""
    labels = [item_label(it.prompt, it.seed, width) for it in items]
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    return [f"{label} #{it.index}" if seen[label] > 1 else label for label, it in zip(labels, items)]


def _short(value, width: int = 48) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def guidance_target(g) -> str:
    """What a guidance term pulls toward, in words ('' when it has no target, e.g. symmetry)."""
    from .guidance import AestheticGuidance, ClassifierGuidance, CLIPImageGuidance, CLIPTextGuidance

    if isinstance(g, CLIPTextGuidance):
        return f'text "{g.prompt}"' if g.prompt is not None else "each item's prompt"
    if isinstance(g, CLIPImageGuidance):
        refs = g.references
        if isinstance(refs, dict):
            return "per prompt: " + "; ".join(f"{p}: {len(r)} images" for p, r in refs.items())
        more = ", ..." if len(refs) > 1 else ""
        return f"{len(refs)} reference image{'s' if len(refs) != 1 else ''} ({_short(refs[0], 32)}{more})"
    if isinstance(g, ClassifierGuidance):
        def name(index: int) -> str:
            labels = g.labels
            return f"{labels[index]} ({index})" if labels is not None and 0 <= index < len(labels) else str(index)
        if isinstance(g.target, dict):
            return "class per prompt: " + "; ".join(f"{p}: {name(t)}" for p, t in g.target.items())
        return f"class {name(g.target)}"
    if isinstance(g, AestheticGuidance):
        return "maximise the score" if g.target is None else f"score {g.target:g}"
    if getattr(g, "needs_latents", False) and type(g).__name__ == "NoiseNormRegularizer":
        return "norm of x_T toward the chi mode"
    return ""


def describe_guidance(guidance) -> list[dict]:
    """Each guidance term as ``{"name", "class", "weight", "target"}`` (target: ``guidance_target``), in the
    order the loss sums them: for TensorBoard's HPARAMS and the contact sheet's title."""
    return [{"name": g.name, "class": type(g).__name__, "weight": float(g.weight),
             "target": _short(guidance_target(g), 120)} for g in guidance or []]


def guidance_title(guidance) -> str:
    """One line naming every term: ``clip_text: text "a green circle" · symmetry ×0.5``."""
    parts = []
    for d in describe_guidance(guidance):
        weight = "" if d["weight"] == 1.0 else f" ×{d['weight']:g}"
        parts.append(f"{d['name']}{weight}" + (f": {d['target']}" if d["target"] else ""))
    return " · ".join(parts)
