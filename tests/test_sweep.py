"""``unifieddelta sweep``: the command as DESIGN.md spells it, bad input (one line, nothing written), a sweep killed
in a subprocess and resumed, and two workers sharing one store."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from unifieddelta import experiments
from unifieddelta.cli import main

PAIR = ["sweep", "--pair", "tiny-lm", "--smoke"]
SWEEP = [*PAIR, "--method", "dare"]


def _cli(*argv) -> list[str]:
    return [sys.executable, "-m", "unifieddelta.cli", *map(str, argv)]


def _records(store) -> dict:
    """key -> (modification time, bytes) of every record in the store."""
    return {p.stem: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.glob("*/*.json")}


def test_sweep_writes_the_table_and_comes_from_the_store_the_second_time(tmp_path, capsys):
    store, csv = tmp_path / "store", tmp_path / "t.csv"
    argv = [
        *SWEEP,
        "--grid",
        "p=0.1,0.5",
        "--seeds",
        "0,1",
        "--measure",
        "term,scores",
        "--limit",
        "2",
        "--store",
        store,
        "--csv",
        csv,
    ]
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "4 trial(s): 0 from the store, 4 measured" in out
    table = pd.read_csv(csv)
    assert set(table.quantity) >= {"term", "score", "d_norm"} and set(table.p) == {0.1, 0.5}
    before = _records(store)
    assert main([str(a) for a in argv]) == 0
    assert "4 trial(s): 4 from the store, 0 measured" in capsys.readouterr().out
    assert _records(store) == before
    pd.testing.assert_frame_equal(pd.read_csv(csv), table)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--method", "daree", "--grid", "p=0.5"], "unknown method 'daree'"),
        (["--grid", "q=0.5"], "unknown parameter(s) q"),
        (["--grid", "p=0.5,1.5"], "p must be in [0, 1)"),
        (["--grid", "p"], "--grid expects NAME=V1,V2"),
        (["--grid", "p=0.5", "--tasks", "ud_add,no_such_task"], "unknown task 'no_such_task'"),
        (["--grid", "p=0.5", "--measure", "term,vibes"], "unknown quantity 'vibes'"),
        (["--grid", "p=0.5", "--seeds", "0,x"], "--seeds expects integers"),
        (["--grid", "p=0.5", "--shard", "2/2"], "expected 0 <= I < N"),
        (["--grid", "p=0.5", "--limit", "0"], "--limit must be a positive"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    store, csv = tmp_path / "store", tmp_path / "t.csv"
    argv = [*(PAIR if "--method" in extra else SWEEP), *extra, "--store", store, "--csv", csv]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not store.exists() and not csv.exists()


def test_bad_pairs_are_one_line(tmp_path, capsys):
    for argv, message in (
        [["sweep", "--pair", "tiny-gpt", "--method", "dare", "--grid", "p=0.5"], "unknown zoo name"],
        [["sweep", "--pre", tmp_path / "a", "--post", tmp_path / "b", "--method", "dare"], "no such folder"],
        [["sweep", "--method", "dare"], "no pair"],
    ):
        assert main([str(a) for a in [*argv, "--store", tmp_path / "s"]]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_a_killed_sweep_resumes_without_recomputing_a_finished_trial(tmp_path):
    grid = "p=" + ",".join(str(p) for p in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8))
    argv = [*SWEEP, "--grid", grid, "--measure", "term,loss_change,second_order"]
    experiments.pair("tiny-lm", smoke=True).folders()  # built before timing the kill
    store = tmp_path / "store"
    proc = subprocess.Popen(_cli(*argv, "--store", store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(_records(store) if store.exists() else {}) < 4 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _records(store)
    assert 0 < len(done) < 8 * 4, "the sweep should have been killed midway"  # 4 records per trial
    result = subprocess.run(
        _cli(*argv, "--store", store, "--csv", tmp_path / "resumed.csv"), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    after = _records(store)
    assert all(after[k] == v for k, v in done.items())  # finished records untouched: not measured again
    assert len(after) == 8 * 4
    clean = subprocess.run(
        _cli(*argv, "--store", tmp_path / "clean", "--csv", tmp_path / "clean.csv"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert clean.returncode == 0, clean.stderr
    resumed, reference = pd.read_csv(tmp_path / "resumed.csv"), pd.read_csv(tmp_path / "clean.csv")
    pd.testing.assert_frame_equal(resumed.drop(columns="seconds"), reference.drop(columns="seconds"))


def test_two_workers_share_a_store_without_overlap(tmp_path):
    argv = [*SWEEP, "--grid", "p=0.1,0.2,0.3,0.4,0.5,0.6", "--seeds", "0,1", "--measure", "term"]
    experiments.pair("tiny-lm", smoke=True).folders()
    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    workers = [
        subprocess.Popen(
            _cli(*argv, "--store", store, "--shard", f"{i}/2"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), [o[1][-500:] for o in outs]
    import json

    records = [json.loads(p.read_text()) for p in store.glob("*/*.json")]
    assert len(records) == 12 * 2  # term and d_norm of each of the 12 trials, each written once
    by_trial = {}
    for r in records:
        by_trial.setdefault(r["trial"], set()).add(r["worker"])
    assert len(by_trial) == 12 and all(len(w) == 1 for w in by_trial.values())  # one worker per trial
    assert len({w for ws in by_trial.values() for w in ws}) == 2  # both did work
    # a third worker (torchrun's variables) finds everything stored
    env3 = dict(env, RANK="0", WORLD_SIZE="1")
    third = subprocess.run(_cli(*argv, "--store", store), env=env3, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "12 from the store, 0 measured" in third.stdout
