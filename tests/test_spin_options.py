"""finetune/spin.py's options and the pure helpers behind its stages: per-iteration β, lengths
fitted to the model's context, the prompt sample, the released-pairs reader, the schedule."""
import json
import types

import pytest

from finetune.chat import ChatTemplate
from finetune.spin import SpinOptions, SpinRun, parse_args

BASE = ["--ckpt", "C", "--data", "D", "--out", "O"]


def test_beta_per_iteration():
    args = parse_args(BASE + ["--iterations", "4", "--beta", "0.1,0.1,0.1,5.0"])
    assert [args.beta_at(t) for t in range(4)] == [0.1, 0.1, 0.1, 5.0]
    one = parse_args(BASE + ["--iterations", "3", "--beta", "0.5"])
    assert [one.beta_at(t) for t in range(3)] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("beta,message", [("0.1,5.0", "--beta has 2 values but --iterations is 4"),
                                          ("0.1,x", "--beta must be numbers separated by commas"),
                                          ("0", "--beta must be positive")])
def test_bad_beta_is_refused(beta, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(BASE + ["--iterations", "4", "--beta", beta])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_resumed_run_may_change_beta_but_not_a_stage_flag(tmp_path):
    """β shapes no stored stage (generations, pairs, reference log-probs): resuming with another
    β for the iterations not yet trained is allowed; a stage flag still is refused."""
    def fake_run(template=ChatTemplate(), **flags):
        args = SpinOptions(ckpt="C", data="D", out=tmp_path, **flags)
        return types.SimpleNamespace(args=args, rank=0, fabric=types.SimpleNamespace(barrier=lambda: None),
                                     template=template)

    SpinRun.check_run_args(fake_run(beta="0.1", iterations=2))
    SpinRun.check_run_args(fake_run(beta="0.1,5.0", iterations=2))  # no error
    with pytest.raises(ValueError, match="--seed was 42"):
        SpinRun.check_run_args(fake_run(beta="0.1", iterations=2, seed=1))
    # The chat template (read from --ckpt's files) shapes every stage too.
    with pytest.raises(ValueError, match="the chat template was ours"):
        SpinRun.check_run_args(fake_run(template=ChatTemplate(user_header="Q: "), beta="0.1", iterations=2))
    assert "beta" not in json.loads((tmp_path / "run_args.json").read_text())


@pytest.mark.parametrize("context,flags,expected", [
    (128, [], (64, 64, 128)),            # a 128-token model: the defaults are cut to fit
    (2048, [], (512, 256, 1024)),        # the paper's lengths where they fit
    (128, ["--max-len", "100"], (50, 78, 100)),
    (128, ["--max-prompt-len", "100", "--max-len", "120"], (100, 28, 120)),
])
def test_lengths_fitted_to_the_context(context, flags, expected):
    from finetune.spin import fit_lengths

    args = parse_args(BASE + flags)
    fit_lengths(args, context)
    assert (args.max_prompt_len, args.max_new_tokens, args.max_len) == expected


def test_prompt_as_long_as_the_row_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(BASE + ["--max-prompt-len", "64", "--max-len", "64"])
    assert e.value.code == 2
    assert "--max-prompt-len 64 must be below --max-len 64" in capsys.readouterr().err
    from finetune.spin import fit_lengths

    args = parse_args(BASE + ["--max-len", "100"])
    args.max_prompt_len = 100  # e.g. from an edited config: caught again once the context is known
    with pytest.raises(ValueError, match="--max-prompt-len 100 must be below --max-len 100"):
        fit_lengths(args, 128)


def test_num_prompts_is_a_seeded_random_sample():
    from finetune.spin_data import sample_rows

    rows = sample_rows(1000, 50, seed=42)
    assert rows == sorted(set(rows)) and len(rows) == 50 and rows != list(range(50))
    assert rows == sample_rows(1000, 50, seed=42) and rows != sample_rows(1000, 50, seed=43)
    assert sample_rows(10, 50, seed=42) == list(range(10))


def released_pair(prompt, real, generated):
    return {"real": [{"role": "user", "content": prompt}, {"role": "assistant", "content": real}],
            "generated": [{"role": "user", "content": prompt}, {"role": "assistant", "content": generated}]}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_read_pairs_in_the_released_layout(tmp_path, suffix):
    from finetune.spin_data import read_pairs

    rows = [released_pair(f"q{i}", f"real {i}", f"gen {i}") for i in range(3)]
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    examples, generated = read_pairs(path)
    assert [(e.index, e.prompt, e.response) for e in examples] == [(i, f"q{i}", f"real {i}") for i in range(3)]
    assert generated == [f"gen {i}" for i in range(3)]


@pytest.mark.parametrize("row,message", [
    ({"real": [{"role": "user", "content": "q"}]}, "pairs.jsonl:1: field 'real' must be a list"),
    ({**released_pair("q", "a", "b"), "generated": [{"role": "user", "content": "other"},
                                                   {"role": "assistant", "content": "b"}]},
     "pairs.jsonl:1: 'real' and 'generated' must share the messages before the answer"),
    (released_pair("q", "a", "b") | {"real": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]},
     "pairs.jsonl:1: the last message of 'real' must be the assistant's answer"),
])
def test_bad_pairs_name_the_line(tmp_path, row, message):
    from finetune.spin_data import read_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        read_pairs(path)


def test_data_or_pairs(capsys):
    assert parse_args(["--ckpt", "C", "--pairs", "P", "--out", "O"]).data is None
    for argv, message in ((["--ckpt", "C", "--out", "O"], "one of --data or --pairs is required"),
                          (BASE + ["--pairs", "P"], "give --data (prompts and real answers; θ0 generates) or "
                                                    "--pairs (given pairs), not both")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err


def test_beta_is_a_typed_list_from_commas_spaces_or_an_old_run_config(tmp_path):
    assert parse_args(BASE + ["--iterations", "4", "--beta", "0.1", "0.1", "0.1", "5"]).beta == [0.1, 0.1, 0.1, 5.0]
    assert parse_args(BASE + ["--iterations", "2", "--beta", "0.1,", "5"]).beta == [0.1, 5.0]
    # config.yaml written before --beta was a list held it as the comma-separated string
    old = tmp_path / "config.yaml"
    old.write_text("options:\n  ckpt: C\n  data: D\n  out: O\n  iterations: 4\n  beta: 0.1,0.1,0.1,5.0\n")
    assert parse_args(["--run-config", str(old)]).beta == [0.1, 0.1, 0.1, 5.0]
    old.write_text("options:\n  ckpt: C\n  data: D\n  out: O\n  iterations: 3\n  beta: 0.5\n")
    assert parse_args(["--run-config", str(old)]).beta == [0.5]
