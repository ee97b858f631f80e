"""Zero-shot accuracy through lm-evaluation-harness on an in-memory (dense, pruned or pruned + LoRA) model.

Every structured-pruning paper reports zero-shot accuracy on seven commonsense tasks next to perplexity (LLM-Pruner,
Shortened LLaMA, SlimGPT: BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA, lm-eval, 0-shot). This module
runs any lm-eval task through lm-eval's own Python API (``HFLM(pretrained=model)`` + ``simple_evaluate``), so the
numbers are lm-eval's, with no re-export and no Hub access when the task's data is local:

* :func:`run_tasks`: tasks by name (built-in, or YAMLs in ``task_dir``), acc / acc_norm with standard errors as
  :class:`TaskScore` rows of a :class:`ZeroShotResult`; progress and cancel per :mod:`pruneviz.progress` between
  tasks and between chunks of log-likelihood requests inside a task;
* :func:`write_mc_task`: a task YAML for a local multiple-choice JSONL file (``question``, ``choices``, ``answer``);
* :func:`write_local_task`: a built-in task (e.g. ``hellaswag``) pointed at local JSON/JSONL copies of its data,
  keeping its prompts and ``process_docs``, under the same name, so ``tasks=["hellaswag"], task_dir=...`` uses them;
* :func:`paper_average`: the seven-task average with the papers' metric per task (:data:`PAPER_TASKS`);
* :func:`choice_logprobs`: lm-eval's multiple-choice scoring rule computed by pruneviz itself (tests cross-check it).

lm-eval is imported lazily (it takes seconds); a missing install gives a message that says how to install it.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import PrunevizError, is_oom, oom_advice
from .fsio import atomic_write_text
from .offload import execution_device
from .progress import Cancel, Cancelled, Progress

__all__ = [
    "LM_EVAL_VERSION",
    "PAPER_TASKS",
    "PAPER_DATA",
    "TaskDataError",
    "TaskScore",
    "ZeroShotResult",
    "accuracy_from_logprobs",
    "check_task_name",
    "choice_logprobs",
    "paper_average",
    "parse_tasks",
    "run_tasks",
    "write_local_task",
    "write_mc_task",
]

LM_EVAL_VERSION = "0.4.13"  # the pinned version (requirements.txt); numbers differ across lm-eval versions

# Metric per task of the papers' seven-task average (Shortened LLaMA's `convert_json2csv_zeroshot`; LLM-Pruner and
# SlimGPT report the same tasks): acc, except acc_norm for HellaSwag, ARC-c and OpenBookQA. AVE = unweighted mean.
PAPER_TASKS: dict[str, str] = {
    "boolq": "acc",
    "piqa": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
}

# Where each of the seven gets its data in lm-eval 0.4.13 and which split it scores: (dataset path, name, split).
PAPER_DATA: dict[str, tuple[str, str | None, str]] = {
    "boolq": ("aps/super_glue", "boolq", "validation"),
    "piqa": ("baber/piqa", None, "validation"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "openbookqa": ("allenai/openbookqa", "main", "test"),
}

_SPLITS = ("training_split", "validation_split", "test_split", "fewshot_split")
_REQUEST_CHUNK = 64  # log-likelihood requests between two progress reports / cancel checks


class TaskDataError(PrunevizError):
    """An lm-eval task is unknown, or its data cannot be read; the message says how to use local files."""


# ------------------------------------------------------------------------------------------------------ results


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class TaskScore:
    """lm-eval's numbers for one task (or group) of a run.

    ``acc`` / ``acc_norm`` and their standard errors (bootstrap or analytic, as lm-eval computes them) are None when
    the task does not define them; ``metrics`` holds every numeric ``metric,filter`` value lm-eval reported.
    ``n`` is the number of documents scored (after ``limit``); ``dataset`` where the data came from (``json`` for
    local files); ``samples`` the per-document log-likelihoods when asked for (``keep_samples=True``).
    """

    task: str
    n: int
    acc: float | None = None
    acc_stderr: float | None = None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    dataset: str = ""
    version: str = ""
    samples: tuple[dict, ...] = ()

    def metric(self, name: str) -> float | None:
        """``acc``, ``acc_norm`` or any other metric name (first filter) of this task."""
        if name in ("acc", "acc_norm"):
            return getattr(self, name)
        for key, value in self.metrics.items():
            if key.split(",")[0] == name:
                return value
        return None


@dataclass
class ZeroShotResult:
    """A run of :func:`run_tasks`: one :class:`TaskScore` per task (and group) done, in the order asked.

    ``complete`` is False when cancelled: ``scores`` then holds the tasks finished before the cancel.
    """

    scores: list[TaskScore]
    tasks: tuple[str, ...]
    limit: int | float | None
    num_fewshot: int
    seconds: float
    complete: bool = True
    lm_eval_version: str = ""

    def by_task(self) -> dict[str, TaskScore]:
        return {s.task: s for s in self.scores}

    def rows(self, label: str = "") -> list[dict]:
        """Table rows: model label, task, n, acc ± stderr, acc_norm ± stderr."""
        return [{"model": label, "task": s.task, "n": s.n, "acc": s.acc, "acc_stderr": s.acc_stderr,
                 "acc_norm": s.acc_norm, "acc_norm_stderr": s.acc_norm_stderr} for s in self.scores]

    def protocol(self) -> str:
        """How the numbers were made, for display next to them."""
        limit = "all documents" if self.limit is None else f"limit {self.limit} documents per task"
        return (f"lm-evaluation-harness {self.lm_eval_version}, {self.num_fewshot}-shot, {limit}; "
                "acc = argmax log-likelihood, acc_norm = argmax log-likelihood / characters.")


def paper_average(result: ZeroShotResult) -> float | None:
    """The papers' seven-task average (metric per task from :data:`PAPER_TASKS`), or None if one is missing."""
    scores = result.by_task()
    values = [scores[t].metric(m) if t in scores else None for t, m in PAPER_TASKS.items()]
    return None if any(v is None for v in values) else sum(values) / len(values)


def parse_tasks(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Task names from ``"piqa,hellaswag"`` (or a list); ``paper`` expands to the seven of :data:`PAPER_TASKS`."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (n.strip() for n in names):
        for task in (PAPER_TASKS if name == "paper" else [name] if name else []):
            if task not in out:
                out.append(task)
    if not out:
        raise TaskDataError("No tasks given. Name lm-eval tasks, e.g. 'piqa,hellaswag', or 'paper' for the seven "
                            "tasks of the papers.")
    return out


# ------------------------------------------------------------------------------------------------- lm-eval glue


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise PrunevizError(
            f"lm-evaluation-harness is not installed ({exc}). Install the pinned version: "
            f".venv/bin/pip install lm_eval=={LM_EVAL_VERSION}"
        ) from exc
    return lm_eval, HFLM


def _yaml_stamp(task_dir: str | None) -> tuple:
    if not task_dir:
        return ()
    folder = Path(task_dir)
    if not folder.is_dir():
        raise TaskDataError(f"The task folder {task_dir} does not exist. Write task YAMLs there with write_mc_task "
                            "or write_local_task, or leave the folder out to use lm-eval's built-in tasks.")
    return tuple(sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*.yaml")))


@functools.lru_cache(maxsize=4)
def _task_manager_cached(task_dir: str | None, stamp: tuple, builtin: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(Path(task_dir).resolve()) if task_dir else None, include_defaults=builtin)


def task_manager(task_dir: str | os.PathLike | None = None, builtin: bool = True):
    """lm-eval's ``TaskManager`` over its built-in tasks (``builtin``) plus the YAMLs in ``task_dir`` (which win on a
    name clash). Cached while the folder's YAML files stay the same (indexing the built-in tasks takes seconds).
    """
    _lm_eval()
    folder = str(task_dir) if task_dir else None
    return _task_manager_cached(folder, _yaml_stamp(folder), builtin or folder is None)


def _manager_for(names: list[str], task_dir) -> object:
    """The local folder's manager alone when it defines every task asked for (seconds faster), else the full one."""
    if task_dir:
        local = task_manager(task_dir, builtin=False)
        if all(n in local.all_tasks for n in names):
            return local
    return task_manager(task_dir)


def _local_recipe(task: str, tm) -> str:
    entry = tm.task_index.get(task)
    cfg = (entry.cfg if entry is not None else None) or {}
    path, config = (PAPER_DATA[task][:2] if task in PAPER_DATA else (cfg.get("dataset_path"), cfg.get("dataset_name")))
    split = PAPER_DATA[task][2] if task in PAPER_DATA else cfg.get("test_split") or cfg.get("validation_split")
    load = f"datasets.load_dataset({path!r}" + (f", {config!r}" if config else "") + f")[{split!r}]" if path else \
        "the task's dataset split"
    return (f"To use local files: on a machine that can reach it, save {load}.to_json('{task}.jsonl'); here run "
            f"pruneviz.zeroshot.write_local_task('{task}', '{task}.jsonl', 'my_tasks') and pass task_dir='my_tasks' "
            "(CLI: --task-dir my_tasks). For your own multiple-choice items use write_mc_task.")


def _is_data_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, FileNotFoundError, TimeoutError)):
        return True
    text = str(exc)
    markers = ("Couldn't reach", "OfflineModeIsEnabled", "Dataset scripts are no longer supported",
               "doesn't exist on the Hub", "Unable to find", "DatasetNotFound")
    return any(m in text for m in markers) or type(exc).__name__ in ("DatasetNotFoundError", "HfHubHTTPError")


def _task_error(task: str, exc: BaseException, tm) -> TaskDataError:
    if isinstance(exc, KeyError) and "not a registered" in str(exc):
        close = difflib.get_close_matches(task, tm.all_tasks, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        return TaskDataError(f"lm-eval has no task named '{task}'.{hint} For your own data write a task YAML with "
                             "pruneviz.zeroshot.write_mc_task and pass its folder as task_dir (CLI: --task-dir).")
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return TaskDataError(f"The data of lm-eval task '{task}' could not be read ({detail}). {_local_recipe(task, tm)}")


def _progress_lm(HFLM, model, tokenizer, batch_size: int, max_length: int | None):
    """An ``HFLM`` around the in-memory model whose log-likelihood loop reports progress and honours cancel."""

    class ProgressLM(HFLM):
        report = None  # (done, total) -> None; raises Cancelled

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            if override_bs is not None or self.report is None:  # rolling windows: one call per document
                return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            out = []
            for start in range(0, len(requests), _REQUEST_CHUNK):
                self.report(start, len(requests))
                out += super()._loglikelihood_tokens(requests[start : start + _REQUEST_CHUNK], disable_tqdm=True)
            self.report(len(requests), len(requests))
            return out

    lm = ProgressLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size,
                    max_length=max_length, softmax_dtype=torch.float32, trust_remote_code=False)
    lm._device = execution_device(model)  # an offloaded model computes on accelerate's execution device
    return lm


@contextlib.contextmanager
def _quiet_and_seeded():
    """lm-eval seeds the global RNGs and logs warnings about in-memory models: restore both afterwards."""
    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _scores(res: dict, keep_samples: bool) -> list[TaskScore]:
    out = []
    for name, entry in res["results"].items():
        metrics = {k: float(v) for k, v in entry.items() if "," in k and _number(v) is not None}
        get = lambda key: _number(entry.get(key))  # noqa: E731
        n = res.get("n-samples", {}).get(name, {}).get("effective", entry.get("sample_len", 0))
        cfg = res.get("configs", {}).get(name, {})
        samples = tuple({"doc_id": s["doc_id"], "target": s["target"], "logprobs": [r[0] for r in s["filtered_resps"]],
                         "acc": s.get("acc"), "acc_norm": s.get("acc_norm")}
                        for s in res.get("samples", {}).get(name, [])) if keep_samples else ()
        out.append(TaskScore(task=name, n=int(n or 0), acc=get("acc,none"), acc_stderr=get("acc_stderr,none"),
                             acc_norm=get("acc_norm,none"), acc_norm_stderr=get("acc_norm_stderr,none"),
                             metrics=metrics, dataset=str(cfg.get("dataset_path", "")),
                             version=str(res.get("versions", {}).get(name, "")), samples=samples))
    return out


def run_tasks(
    model,
    tokenizer,
    tasks: str | list[str] | tuple[str, ...],
    limit: int | float | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
    task_dir: str | os.PathLike | None = None,
    max_length: int | None = None,
    bootstrap_iters: int = 1000,
    keep_samples: bool = False,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> ZeroShotResult:
    """Run lm-eval ``tasks`` on the in-memory ``model`` with ``tokenizer``; acc / acc_norm ± stderr per task.

    ``tasks``: names or ``"piqa,hellaswag"`` (``paper`` = the seven of :data:`PAPER_TASKS`); built-in lm-eval tasks,
    or YAMLs in ``task_dir`` (:func:`write_mc_task`, :func:`write_local_task`; same name overrides the built-in).
    ``limit``: the first N documents of each task (or a fraction < 1), as lm-eval's ``--limit``: quick, not
    comparable with full runs. The model is wrapped as ``HFLM(pretrained=model)`` (log-softmax in fp32; inputs go
    to :func:`pruneviz.offload.execution_device`); nothing is exported or downloaded; the caller's tokenizer and
    global RNG states are left as they were. Standard errors: lm-eval's (analytic for acc means,
    ``bootstrap_iters`` resamples for the rest).

    Each task is one ``simple_evaluate`` call. ``progress(fraction, message)`` reports tasks and, inside a task,
    chunks of log-likelihood requests; ``cancel()`` is polled between them; a cancelled run returns the finished
    tasks with ``complete=False`` (:mod:`pruneviz.progress`). An unknown task or unreachable data raises
    :class:`TaskDataError` naming the task and how to point it at local files.
    """
    lm_eval, HFLM = _lm_eval()
    names = parse_tasks(tasks)
    if limit is not None and not (limit > 0):
        raise ValueError(f"limit must be > 0 (documents per task, or a fraction < 1), got {limit}")
    limit = int(limit) if limit is not None and limit >= 1 else limit
    tm = _manager_for(names, task_dir)
    with _quiet_and_seeded():
        lm = _progress_lm(HFLM, model, tokenizer, batch_size, max_length)
    start, scores, complete = time.perf_counter(), [], True
    for i, task in enumerate(names):
        def report(done, total, i=i, task=task):
            if cancel is not None and cancel():
                raise Cancelled(f"cancelled during {task}")
            if progress is not None:
                progress((i + done / max(total, 1)) / len(names), f"{task}: requests {done}/{total}")

        if cancel is not None and cancel():
            complete = False
            break
        lm.report = report
        try:
            with _quiet_and_seeded():
                res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, limit=limit,
                                              num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                                              log_samples=keep_samples)
        except Cancelled:
            complete = False
            break
        except Exception as exc:  # noqa: BLE001
            if is_oom(exc):
                raise oom_advice(exc, f"running lm-eval task '{task}' (use a smaller batch_size)") from exc
            if (isinstance(exc, KeyError) and "not a registered" in str(exc)) or _is_data_error(exc):
                raise _task_error(task, exc, tm) from exc
            raise
        scores += _scores(res, keep_samples)
        if progress is not None:
            progress((i + 1) / len(names), f"{task} done")
    return ZeroShotResult(scores=scores, tasks=tuple(names), limit=limit, num_fewshot=num_fewshot,
                          seconds=time.perf_counter() - start, complete=complete, lm_eval_version=lm_eval.__version__)


# ------------------------------------------------------------------------------------------------ local data


def _write_yaml(path: Path, config: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, yaml.safe_dump(config, sort_keys=False), "the task YAML")


def check_task_name(name: str) -> None:
    """Refuse a task name that is not a plain file stem (letters, digits, '_', '-', '.')."""
    if not name or name.startswith(".") or not all(c.isalnum() or c in "_-." for c in name):
        raise TaskDataError(f"Task name {name!r} is not usable: use letters, digits, '_', '-' or '.'.")


def _check_mc_rows(path: Path, question: str, choices: str, answer: str) -> int:
    """Validate a multiple-choice JSONL file; returns the number of items."""
    if not path.is_file():
        raise TaskDataError(f"{path} does not exist. Give the path of a JSONL file with one item per line.")
    n = 0
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"{where} is not JSON ({exc.msg}). Write one JSON object per line.") from exc
            missing = [k for k in (question, choices, answer) if not isinstance(row, dict) or k not in row]
            if missing:
                raise TaskDataError(f"{where} lacks the field(s) {', '.join(missing)}. Each line needs "
                                    f"'{question}' (text), '{choices}' (list of answers) and '{answer}' (index).")
            opts, gold = row[choices], row[answer]
            if not isinstance(opts, list) or len(opts) < 2 or not all(isinstance(c, str) and c for c in opts):
                raise TaskDataError(f"{where}: '{choices}' must be a list of at least two non-empty strings.")
            if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(opts):
                raise TaskDataError(f"{where}: '{answer}' must be the index (0..{len(opts) - 1}) of the right choice.")
            if not isinstance(row[question], str) or not row[question].strip():
                raise TaskDataError(f"{where}: '{question}' must be non-empty text.")
            n += 1
    if n == 0:
        raise TaskDataError(f"{path} has no items. Write one JSON object per line.")
    return n


def write_mc_task(
    jsonl: str | os.PathLike,
    folder: str | os.PathLike,
    name: str,
    question: str = "question",
    choices: str = "choices",
    answer: str = "answer",
    metrics: tuple[str, ...] = ("acc", "acc_norm"),
) -> Path:
    """Write ``folder/<name>.yaml``: an lm-eval multiple-choice task over a local JSONL file.

    Each line of ``jsonl`` is ``{"question": str, "choices": [str, ...], "answer": int}`` (field names
    configurable). lm-eval scores every choice as the continuation ``" " + choice`` of the question (its
    ``target_delimiter``) and reports acc (argmax log-likelihood) and acc_norm (log-likelihood / characters). The
    file is validated first (clear message with the line number on a bad item); the YAML is written atomically.
    Run it with ``run_tasks(..., tasks=[name], task_dir=folder)``. Returns the YAML's path.
    """
    check_task_name(name)
    data = Path(jsonl).expanduser().resolve()
    _check_mc_rows(data, question, choices, answer)
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": f"{{{{{question}}}}}",
        "doc_to_choice": f"{{{{{choices}}}}}",
        "doc_to_target": f"{{{{{answer}}}}}",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
        "metadata": {"version": 1.0, "source": "pruneviz.zeroshot.write_mc_task"},
    }
    return _write_yaml(Path(folder) / f"{name}.yaml", config)


def write_local_task(
    task: str,
    data_files: str | os.PathLike | dict[str, str | os.PathLike],
    folder: str | os.PathLike,
    name: str | None = None,
) -> Path:
    """Write ``folder/<name>.yaml``: lm-eval's built-in ``task`` reading local JSON/JSONL files instead of the Hub.

    The YAML ``include``s lm-eval's own task file (prompts, choices, ``process_docs`` and metrics unchanged) and
    replaces only the data source: ``dataset_path: json`` with ``dataset_kwargs.data_files``. ``data_files`` maps
    split names (``train`` / ``validation`` / ``test``) to files in the Hub dataset's schema (what
    ``datasets.load_dataset(...)[split].to_json(path)`` writes); a single path is taken as the split the task
    scores (:data:`PAPER_DATA` lists them for the seven). Splits without a file are switched off. ``name`` defaults
    to ``task``, so with ``task_dir=folder`` the local copy replaces the built-in one under its own name.
    """
    name = name or task
    check_task_name(name)
    entry = task_manager().task_index.get(task)
    if entry is None or entry.yaml_path is None or entry.cfg is None or "dataset_path" not in entry.cfg:
        raise TaskDataError(f"'{task}' is not a single lm-eval YAML task (groups and Python tasks are not supported "
                            "here). Name one task, e.g. hellaswag; for your own items use write_mc_task.")
    cfg = entry.cfg
    scored = "test" if cfg.get("test_split") else "validation"
    files = {scored: data_files} if isinstance(data_files, (str, os.PathLike)) else dict(data_files)
    known = {"train": "training_split", "validation": "validation_split", "test": "test_split"}
    for split, file in files.items():
        if split not in known:
            raise TaskDataError(f"Unknown split '{split}' for {task}: use train, validation or test.")
        if not Path(file).expanduser().is_file():
            raise TaskDataError(f"The {split} file of {task}, {file}, does not exist.")
    config = {
        "include": str(Path(entry.yaml_path).resolve()),
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {s: str(Path(f).expanduser().resolve()) for s, f in files.items()}},
    }
    for split, key in known.items():  # lm-eval's split names are the HF ones; point them at the files given
        config[key] = split if split in files else None
    if cfg.get("fewshot_split") and cfg["fewshot_split"] not in files:
        config["fewshot_split"] = None
    if not (config["test_split"] or config["validation_split"]):
        raise TaskDataError(f"Give {task} a validation or test file: it scores its '{scored}' split.")
    return _write_yaml(Path(folder) / f"{name}.yaml", config)


# --------------------------------------------------------------------------------- pruneviz's own scoring rule


def choice_logprobs(model, tokenizer, context: str, choices: list[str], delimiter: str = " ") -> list[float]:
    """Log-likelihood of each ``delimiter + choice`` after ``context``, by lm-eval's multiple-choice rule.

    As lm-eval's ``HFLM``: whole = encode(context + continuation), context tokens = encode(context), the choice's
    tokens are whole[len(context tokens):] (trailing spaces of the context move to the continuation); the tokenizer's
    default special tokens are added; one unpadded forward per choice; log-softmax in fp32. Used to check lm-eval's
    numbers independently; lm-eval's acc is ``argmax`` of these, acc_norm ``argmax`` of these / ``len(choice)``.
    """
    device = execution_device(model)
    out = []
    for choice in choices:
        cont = delimiter + choice
        spaces = len(context) - len(context.rstrip())
        ctx, cont = (context[:-spaces], context[-spaces:] + cont) if spaces else (context, cont)
        whole = list(tokenizer(ctx + cont)["input_ids"])
        n_ctx = len(tokenizer(ctx)["input_ids"])
        ids = torch.tensor([whole], device=device)  # [1, T]
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)  # [T-1, V]
        targets = ids[0, n_ctx:]  # [n_cont]
        out.append(float(logp[n_ctx - 1 :].gather(-1, targets.view(-1, 1)).sum()))
    return out


def accuracy_from_logprobs(logprobs: list[list[float]], choices: list[list[str]],
                           gold: list[int]) -> tuple[float, float]:
    """(acc, acc_norm) of items from their choices' log-likelihoods, by lm-eval's rule (first maximum wins)."""
    acc = sum(max(range(len(lp)), key=lambda j: (lp[j], -j)) == g for lp, g in zip(logprobs, gold))
    norm = sum(max(range(len(lp)), key=lambda j: (lp[j] / len(c[j]), -j)) == g
               for lp, c, g in zip(logprobs, choices, gold))
    return acc / len(gold), norm / len(gold)
