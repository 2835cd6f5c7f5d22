"""Bad inputs, as a hostile new user types them: each is refused with a non-zero exit and one line that names the
bad value and what is allowed, without a traceback, and with nothing written that would block the corrected
command (no folder, no lock, no half-built replacement; a folder that was there is left as it was)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cachepolicy.cli import main

LAB = "a red triangle bouncing slowly over a gray-to-purple gradient"
RUN = ["run", "tiny-wan", "--chunks", "1", "--out", "OUT"]
LAB_RUN = ["run", "drift-lab", "--chunks", "1", "--out", "OUT"]
CMP = ["compare", "tiny-wan", "--policies", "full", "--prompts", "a red fox", "--chunks", "1", "--metrics",
       "cache-tokens", "--no-progress", "--out", "OUT"]


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value replaced (or the flag added)."""
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
        return argv
    return [*argv, flag, value]


# (id, argv, setup, fragments the one line must hold: the bad value, and what is allowed or what to do)
CASES = [
    # ---- run: names
    ("run-model-typo", ["run", "tiny-van", "--chunks", "1", "--out", "OUT"], None,
     ["'tiny-van'", "Did you mean 'tiny-wan'", "Known models:"]),
    ("run-policy-typo", [*RUN, "--policy", "sliding-windw"], None, ["'sliding-windw'", "Did you mean"]),
    ("run-recipe-typo", [*RUN, "--recipe", "causvit"], None, ["'causvit'", "Did you mean 'causvid'"]),
    # ---- run: policy specs and their numbers
    ("run-param-not-int", [*RUN, "--policy", "sliding-window:frames=x"], None, ["frames='x'", "integer"]),
    ("run-param-too-small", [*RUN, "--policy", "sliding-window:frames=1"], None, ["frames=1", "shorter than one chunk"]),
    ("run-param-int64", [*RUN, "--policy", "sliding-window:frames=100000000000000000000000"], None,
     ["100000000000000000000000", "at most 2**63 - 1"]),
    ("run-param-float32", [*RUN, "--policy", "tokentrim:p=1e39"], None, ["p=1e+39", "(0.0, 1.0)"]),
    ("run-param-no-value", [*RUN, "--policy", "sliding-window:frames"], None, ["'frames'", "key=value"]),
    ("run-spec-empty-term", [*RUN, "--policy", "full+"], None, ["'full+'", "empty term"]),
    ("run-policy-twice", [*RUN, "--policy", "full", "--policy", "full"], None, ["'full' appears twice", "at most once"]),
    ("run-param-unknown", [*RUN, "--policy", "sliding-window:frame=6"], None, ["frame", "frames"]),
    # ---- run: lengths, seeds, batches
    ("run-chunks-rope", _set(RUN, "--chunks", "400"), None, ["1200 latent frames", "at most 341 chunks"]),
    ("run-seed-int64", [*RUN, "--seed", "99999999999999999999"], None,
     ["99999999999999999999", "at most 2**63 - 1"]),
    ("run-seed-plus-batch", [*RUN, "--seed", "9223372036854775807", "--batch", "2"], None,
     ["9223372036854775807", "at most 9223372036854775806"]),
    ("run-batch-memory", [*RUN, "--batch", "100000000"], None, ["batch of 100000000", "use a batch of at most"]),
    ("run-prompts-vs-batch", [*RUN, "--batch", "3", "--prompt", "a", "--prompt", "b"], None,
     ["2 prompts for a batch of 3", "one per sample"]),
    ("run-switch-past-end", _set([*RUN, "--switch", "4:a dog"], "--chunks", "4"), None,
     ["chunk 4 does not exist", "chunks 1..3"]),
    ("run-switch-order", _set([*RUN, "--switch", "2:a b", "--switch", "1:c"], "--chunks", "4"), None,
     ["chunk 1 after 2", "strictly increasing"]),
    # ---- run: model options, devices, dtypes, weights folders
    ("run-dtype", [*RUN, "--dtype", "float8"], None, ["'float8'", "float32, bfloat16, float16"]),
    ("run-device-unknown", [*RUN, "--device", "foo"], None, ["'foo'", "cpu, cuda, cuda:N or mps"]),
    ("run-device-missing", [*RUN, "--device", "cuda:7"], None, ["'cuda:7'", "available:", "cpu"]),
    ("run-option-type", [*RUN, "--model-option", "seed=abc"], None, ["seed='abc'", "takes int for seed"]),
    ("run-option-int64", [*RUN, "--model-option", "seed=100000000000000000000000"], None,
     ["100000000000000000000000", "at most 2**63 - 1"]),
    ("run-option-unknown-key", [*RUN, "--model-option", "foo=1"], None, ["['foo']", "known:"]),
    ("run-lab-option-unknown", [*LAB_RUN, "--model-option", "foo=1"], None,
     ["foo=1", "takes no option 'foo'", "path, device, dtype, steps, noise, guidance"]),
    ("run-lab-option-float32", [*LAB_RUN, "--model-option", "guidance=1e39"], None,
     ["1e+39", "finite number of float32"]),
    ("run-lab-steps", [*LAB_RUN, "--model-option", "steps=0"], None, ["got 0", "positive int"]),
    ("run-lab-noise", [*LAB_RUN, "--model-option", "noise=loud"], None, ["'loud'", "fresh, predicted"]),
    ("run-lab-steps-type", [*LAB_RUN, "--model-option", "steps=1.5"], None, ["steps=1.5", "takes int or none"]),
    ("run-lab-garbage-config", [*LAB_RUN, "--model-option", "path=WEIGHTS_GARBAGE"], "weights_garbage",
     ["config.json is not JSON"]),
    ("run-lab-list-config", [*LAB_RUN, "--model-option", "path=WEIGHTS_LIST"], "weights_list",
     ["config.json holds a JSON list, not an object"]),
    ("run-lab-no-config", [*LAB_RUN, "--model-option", "path=WEIGHTS_EMPTY"], "weights_empty",
     ["holds no config.json", "DIR/final"]),
    # ---- run: prompts the drift lab cannot draw
    ("run-lab-unknown-word", [*LAB_RUN, "--prompt", "a red disc bouncing slowly over a teal-to-purpel gradient"],
     None, ["'purpel'", "vocabulary is:"]),
    ("run-lab-word-order", [*LAB_RUN, "--prompt", "red a triangle bouncing slowly over a gray-to-purple gradient"],
     None, ["word 1, got 'red'", "a/an/two/three"]),
    ("run-lab-ends-early", [*LAB_RUN, "--prompt", "a red disc"], None, ["word 4", "'bouncing'"]),
    ("run-lab-trailing-words", [*LAB_RUN, "--prompt", f"{LAB} and"], None, ["after 'gradient'", "'and'"]),
    ("run-lab-too-many-sprites",
     [*LAB_RUN, "--prompt", "two cyan discs and a red square bouncing slowly over a teal-to-purple gradient"],
     None, ["asks for 3 sprites", "1 to 2"]),
    ("run-lab-same-colours", [*LAB_RUN, "--prompt", "a red disc and a red square bouncing slowly over a "
                                                    "teal-to-purple gradient"], None, ["distinct colours"]),
    ("run-lab-switch-prompt", _set([*LAB_RUN, "--prompt", LAB, "--switch", "1:a red disc"], "--chunks", "2"),
     None, ["'a red disc'", "'bouncing'"]),
    # ---- run: the output folder
    ("run-out-is-file", RUN, "out_file", ["exists and is not a folder"]),
    ("run-out-under-file", _set(RUN, "--out", "FILE/run"), "a_file", ["cannot be created", "is a file"]),
    ("run-out-holds-run", RUN, "out_run", ["already holds a run", "pass --force"]),
    ("run-out-damaged-run", RUN, "out_run_damaged", ["already holds a run", "no readable run.json", "pass --force"]),
    ("run-out-foreign", [*RUN, "--force"], "out_foreign", ["notes.txt", "choose an empty or new folder"]),
    ("run-out-compare-folder", [*RUN, "--force"], "out_compare", ["config.json", "not part of a cachepolicy run"]),
    # ---- run: the command line itself
    ("run-chunks-zero", _set(RUN, "--chunks", "0"), None, ["--chunks", "must be at least 1"]),
    ("run-chunks-text", _set(RUN, "--chunks", "abc"), None, ["'abc' is not an integer"]),
    ("run-seed-negative", [*RUN, "--seed", "-1"], None, ["-1 is negative"]),
    ("run-columns-zero", [*RUN, "--columns", "0"], None, ["--columns", "must be at least 1"]),
    ("run-switch-malformed", [*RUN, "--switch", "x:y"], None, ["'x:y'", "CHUNK:PROMPT"]),
    ("run-option-no-equals", [*RUN, "--model-option", "seed"], None, ["'seed'", "KEY=VALUE"]),
    ("run-no-out", RUN[:-2], None, ["required: --out"]),
    ("run-unknown-flag", [*RUN, "--chunkz", "3"], None, ["unrecognized arguments: --chunkz 3"]),
    # ---- compare: the grid
    ("cmp-seeds-text", _set(CMP, "--seeds", "0-x"), None, ["'0-x'", "'0-7' or '0,3,5'"]),
    ("cmp-seeds-backwards", _set(CMP, "--seeds", "5-2"), None, ["'5-2'", "write 2-5"]),
    ("cmp-seeds-too-many", _set(CMP, "--seeds", "0-100000000000"), None,
     ["100000000001 seeds", "at most 100000 jobs"]),
    ("cmp-seed-int64", _set(CMP, "--seeds", "99999999999999999999"), None,
     ["99999999999999999999", "[0, 2**63)"]),
    ("cmp-grid-too-large", _set(_set(CMP, "--seeds", "0-99999"), "--policies", "full; sliding-window:frames=3"),
     None, ["200000 jobs", "at most 100000"]),
    ("cmp-prompts-missing-file", _set(CMP, "--prompts", "missing-prompts.txt"), None,
     ["missing-prompts.txt does not exist"]),
    ("cmp-prompts-empty-file", _set(CMP, "--prompts", "PROMPTS_EMPTY"), "prompts_empty",
     ["holds no prompt", "one per line"]),
    ("cmp-prompts-not-utf8", _set(CMP, "--prompts", "PROMPTS_LATIN1"), "prompts_latin1",
     ["is not UTF-8 text", "byte 0xe9 on line 2", "save it as UTF-8"]),
    ("cmp-prompts-none", _set(CMP, "--prompts", ";;"), None, ["no prompts in ';;'"]),
    ("cmp-policies-none", _set(CMP, "--policies", " ; "), None, ["no policies", "--policies 'full; "]),
    ("cmp-policy-twice", _set(CMP, "--policies", "full; full"), None,
     ["spec 2 of 2 ('full') is the same policy as spec 1", "list each policy once"]),
    ("cmp-policy-twice-spelled-apart", _set(CMP, "--policies", "sliding-window:frames=3; sliding-window:frames=03"),
     None, ["spec 2 of 2", "same policy as spec 1"]),
    ("cmp-policy-typo", _set(CMP, "--policies", "full; sliding-windw:frames=3"), None,
     ["policy spec 2 of 2 ('sliding-windw:frames=3')", "Did you mean"]),
    ("cmp-policy-short-window", _set(CMP, "--policies", "full; sliding-window:frames=2"), None,
     ["frames=2", "shorter than one chunk"]),
    ("cmp-model-typo", ["compare", "tiny-wan", "tiny-skyrels", *CMP[2:]], None,
     ["'tiny-skyrels'", "Did you mean 'tiny-skyreels'"]),
    ("cmp-recipe-typo", [*CMP, "--recipe", "longliv"], None, ["'longliv'", "Did you mean 'longlive'"]),
    ("cmp-chunks-rope", _set(CMP, "--chunks", "400"), None, ["rope_max_seq_len=1024", "at most 341 chunks"]),
    ("cmp-metric-typo", _set(CMP, "--metrics", "latent-drfit"), None, ["'latent-drfit'", "Did you mean 'latent-drift'"]),
    ("cmp-metric-unavailable", _set(CMP, "--metrics", "feature-consistency"), None,
     ["'feature-consistency'", "unavailable: needs local weights"]),
    ("cmp-metric-option-no-dot", [*CMP, "--metric-option", "foo=1"], None, ["foo=1", "METRIC.KEY=VALUE"]),
    ("cmp-metric-option-unused", [*CMP, "--metric-option", "flicker.x=1"], None,
     ["['flicker']", "not computed"]),
    ("cmp-option-type", [*CMP, "--model-option", "seed=abc"], None, ["seed='abc'", "takes int for seed"]),
    ("cmp-device-missing", [*CMP, "--device", "cuda:7"], None, ["'cuda:7'", "available:"]),
    ("cmp-executor", [*CMP, "--executor", "slurm"], None, ["'slurm'", "'local', 'ray'"]),
    ("cmp-lab-word-order", ["compare", "drift-lab", *_set(CMP, "--prompts", "red a disc")[2:]], None,
     ["word 1, got 'red'", "a/an/two/three"]),
    # ---- compare: the output folder
    ("cmp-out-is-file", CMP, "out_file", ["exists and is not a folder"]),
    ("cmp-out-other-config", _set(CMP, "--chunks", "2"), "out_compare",
     ["another configuration (differs in: num_chunks)", "pass --force"]),
    ("cmp-out-foreign", CMP, "out_foreign", ["notes.txt", "pass --force"]),
    ("cmp-out-run-folder", CMP, "out_run", ["not part of a comparison", "run.json"]),
    ("cmp-out-damaged-line", CMP, "damaged_line", ["results.jsonl line 2 is damaged", "no 'policy'",
                                                   "pass --force"]),
    ("cmp-out-damaged-config", CMP, "damaged_config", ["config.json is damaged: not JSON", "pass --force"]),
    ("cmp-out-foreign-job", CMP, "foreign_job", ["results.jsonl line 2 is damaged", "'a blue bird'",
                                                 "not in the configuration"]),
    # ---- report
    ("report-not-a-folder", ["report", "OUT"], None, ["has no config.json", "not a compare output folder"]),
    ("report-damaged-config", ["report", "OUT"], "damaged_config", ["config.json is damaged: not JSON"]),
    ("report-damaged-line", ["report", "OUT"], "damaged_line", ["results.jsonl line 2 is damaged: no 'policy'"]),
    ("report-not-a-record", ["report", "OUT"], "list_line", ["line 2 is damaged", "a JSON list, not an object"]),
    ("report-bad-metric-value", ["report", "OUT"], "bad_metric", ["line 2 is damaged", "metric 'cache-tokens'"]),
    ("report-foreign-job", ["report", "OUT"], "foreign_job", ["line 2 is damaged", "not in the configuration"]),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A finished run and a finished comparison to copy into cases."""
    base = tmp_path_factory.mktemp("folders")
    assert main(["run", "tiny-wan", "--chunks", "1", "--out", str(base / "run"), "--no-progress"]) == 0
    assert main(_set(CMP, "--out", str(base / "cmp"))) == 0
    return base


def _setup(kind: str | None, tmp_path: Path, folders: Path) -> dict[str, str]:
    """Lay out what a case needs in ``tmp_path``; returns placeholder -> path."""
    out = tmp_path / "out"
    paths = {"OUT": str(out), "FILE": str(tmp_path / "file")}
    if kind is None:
        return paths
    if kind in ("out_file", "a_file"):
        (out if kind == "out_file" else tmp_path / "file").write_text("not a folder\n")
    elif kind in ("out_run", "out_run_damaged"):
        shutil.copytree(folders / "run", out)
        if kind == "out_run_damaged":
            (out / "run.json").write_bytes(b"\x00garbage")
    elif kind == "out_foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
    elif kind.startswith("weights_"):
        weights = tmp_path / kind
        weights.mkdir()
        content = {"weights_garbage": "{{{ not json", "weights_list": "[1, 2]"}.get(kind)
        if content is not None:
            (weights / "config.json").write_text(content)
        paths[kind.upper()] = str(weights)
    elif kind.startswith("prompts_"):
        prompts = tmp_path / f"{kind}.txt"
        prompts.write_bytes(b"# only a comment\n\n" if kind == "prompts_empty" else b"a red fox\na caf\xe9\n")
        paths[kind.upper()] = str(prompts)
    else:  # a finished comparison, damaged as the case says
        shutil.copytree(folders / "cmp", out)
        results = out / "results.jsonl"
        record = json.loads(results.read_text().splitlines()[0])
        extra = {
            "damaged_line": json.dumps({k: v for k, v in record.items() if k != "policy"}),
            "list_line": json.dumps([record]),
            "bad_metric": json.dumps({**record, "metrics": {"cache-tokens": "many"}}),
            "foreign_job": json.dumps({**record, "prompt": "a blue bird"}),
        }.get(kind)
        if extra is not None:
            with open(results, "a") as handle:
                handle.write(extra + "\n")
        if kind == "damaged_config":
            (out / "config.json").write_text("{ garbage")
    return paths


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with the bytes of its files (folders: None)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("argv, setup, fragments", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_refused_in_one_line_and_writes_nothing(tmp_path, folders, capsys, argv, setup, fragments):
    paths = _setup(setup, tmp_path, folders)
    argv = [next((arg.replace(k, v) for k, v in paths.items() if k in arg), arg) for arg in argv]
    before = _tree(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if not line.startswith("WARNING ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert _tree(tmp_path) == before  # nothing created, nothing changed: the corrected command can run


def test_the_suite_has_enough_bad_inputs():
    assert len(CASES) >= 60 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case, fix", [
    ("run-lab-word-order", ["--prompt", LAB]),
    ("run-out-holds-run", ["--force"]),
    ("run-out-damaged-run", ["--force"]),
    ("cmp-policy-twice", ["--policies", "full; sliding-window:frames=3"]),
    ("cmp-out-damaged-line", ["--force"]),
    ("cmp-out-damaged-config", ["--force"]),
])
def test_the_corrected_command_runs(tmp_path, folders, capsys, case, fix):
    """After a refusal, the command with the mistake corrected runs (``--force`` works on a damaged folder)."""
    _, argv, setup, _ = next(c for c in CASES if c[0] == case)
    paths = _setup(setup, tmp_path, folders)
    argv = [next((arg.replace(k, v) for k, v in paths.items() if k in arg), arg) for arg in argv]
    assert main(argv) == 2
    for flag, value in zip(fix[::2], fix[1::2] or [None]):
        argv = _set(argv, flag, value) if value is not None else [*argv, flag]
    assert main(argv) == 0, capsys.readouterr().err
    if "--force" in fix and setup.startswith("damaged"):  # the damaged folder went to an archive, whole
        assert len(list(Path(paths["OUT"]).glob("archive-*/results.jsonl"))) == 1
