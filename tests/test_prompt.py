"""Prompt expansion with a tiny random Qwen2 LM built here: style examples drawn from the data, determinism,
`stdit prompt expand`, and `stdit generate` / `stdit eval --expand-prompt` on a briefly trained run."""
import json

import numpy as np
import pytest
from tiny_hf import tiny_lm

FAST = ["model.hidden_size=32", "model.depth=1", "model.num_heads=4", "data.resolutions=[[8,8]]",
        "data.frame_counts=[1,4]", "data.batch_size=2", "data.micro_batches=0", "data.token_budget=64",
        "data.num_samples=8",
        "text.hidden_size=16", "text.num_layers=1", "text.ff_size=32", "run.samples_at_end=0", "data.window=0"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_lm(tmp_path_factory.mktemp("lm") / "lm")


def test_expand_command_is_deterministic_and_shows_the_datas_style(lm, tmp_path, capsys):
    from stdit.cli import main
    from stdit.eval_measure import parse_caption
    argv = ["prompt", "expand", "--model", str(lm), "--prompt", "a cat", "--prompt", "a dog", "--recipe",
            "recipes/tiny.yaml", "--device", "cpu", "--max-new-tokens", "6"]
    main([*argv, "--out", str(tmp_path / "a.json")])
    printed = capsys.readouterr().out.splitlines()
    records = json.loads((tmp_path / "a.json").read_text())
    assert [r["prompt"] for r in records] == ["a cat", "a dog"] and printed == [r["expanded"] for r in records]
    assert all(r["expanded"] and r["expanded"] != r["prompt"] for r in records)
    r = records[0]
    assert r["model"] == str(lm.resolve()) and r["model_type"] == "qwen2" and r["seed"] == 0
    assert len(r["examples"]) == 4 and all(parse_caption(e) for e in r["examples"])  # the synthetic world's
    main([*argv, "--out", str(tmp_path / "b.json")])
    assert json.loads((tmp_path / "b.json").read_text()) == records
    main([*argv, "--seed", "1", "--out", str(tmp_path / "c.json")])
    assert json.loads((tmp_path / "c.json").read_text())[0]["examples"] != r["examples"]
    capsys.readouterr()
    for extra, says in ((["--model", str(tmp_path)], "not a local transformers model folder"),
                        (["--run", str(tmp_path)], "give --run (a run's data) or --recipe")):
        with pytest.raises(SystemExit) as e:
            main([*argv, *extra])
        assert e.value.code == 2 and says in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # refused before any clip is generated
        main(["eval", "--run", str(tmp_path), "--out", str(tmp_path / "o"), "--expand-prompt", str(tmp_path)])
    assert e.value.code == 2 and "not a local transformers model folder" in capsys.readouterr().err


def test_examples_come_from_shards_or_the_caption_manifest(tmp_path):
    from PIL import Image

    from stdit.config import load_config
    from stdit.data.ingest import shard
    from stdit.prompt import style_examples
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"shard caption {i}")
    shard(src, tmp_path / "shards", progress=False)
    over = ["data.source=shards", f"data.shards=[{tmp_path}/shards/shard-*.tar]"]
    cfg = load_config("recipes/tiny.yaml", over)
    picked = style_examples(cfg.data, 3, seed=0)
    assert len(set(picked)) == 3 and set(picked) <= {f"shard caption {i}" for i in range(6)}
    assert style_examples(cfg.data, 3, seed=0) == picked and style_examples(cfg.data, 10) != picked
    gone = load_config("recipes/tiny.yaml", ["data.source=shards", f"data.shards=[{tmp_path}/moved/*.tar]"])
    assert style_examples(gone.data, 3) == []  # generating where the training data is not: no examples, no error
    rows = [{"shard": "shard-000000.tar", "key": f"{i:09d}", "caption": f"a long new caption {i}",
             "original": f"shard caption {i}", "source": f"{i}.png"} for i in range(6)]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("recipes/tiny.yaml", over + [f"data.captions={tmp_path / 'captions.jsonl'}"])
    assert all(e.startswith("a long new caption") for e in style_examples(cfg.data, 4))


def test_generate_and_eval_expand_the_prompt(lm, tmp_path, capsys, monkeypatch):
    import stdit.commands.generate as command
    from stdit.cli import main
    from stdit.evaluate import evaluate
    run = tmp_path / "run"
    main(["train", "recipes/tiny.yaml", *FAST, "run.steps=1", f"run.dir={run}"])
    given = []
    real = command.generate
    monkeypatch.setattr(command, "generate", lambda *a, **k: given.append(a[3]) or real(*a, **k))
    capsys.readouterr()
    main(["generate", "--run", str(run), "--prompt", "a red square", "--frames", "4", "--height", "8", "--width", "8",
          "--steps", "1", "--upscale", "1", "--device", "cpu", "--expand-prompt", str(lm), "--out",
          str(tmp_path / "v.mp4")])
    printed = capsys.readouterr().out
    [record] = json.loads((tmp_path / "v.prompt.json").read_text())
    assert record["prompt"] == "a red square" and f"expanded prompt: {record['expanded']}" in printed
    assert given == [record["expanded"]] and (tmp_path / "v.mp4").is_file()
    results = evaluate(run, tmp_path / "eval", n=2, modes=["t2v"], steps=1, device="cpu", expand_prompt=str(lm))
    assert list(results["modes"]) == ["t2v", "t2v+expanded"]
    plain, expanded = results["modes"]["t2v"]["clips"], results["modes"]["t2v+expanded"]["clips"]
    assert [c["caption"] for c in plain] == [c["caption"] for c in expanded]  # scored against the same captions
    assert all(c["prompt"] == results["expanded"][c["caption"]] != c["caption"] for c in expanded)
    assert (tmp_path / "eval" / "contact_t2v+expanded.png").is_file()
