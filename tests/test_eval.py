"""`stdit eval`: the pixel measurements validated on the dataset's own clips (right captions ~100%, shuffled ones
near chance), the caption grammar, the conditioned-mode metrics (boundary jump, loop closure) and the long-video
chunk scoring on constructed clips, the given frames of every mode, and the command end to end in every mode on a
2-step run with its report.html opened in a real headless browser."""
import contextlib
import io
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from stdit.cli import main as cli_main
from stdit.config import load_config
from stdit.data.synthetic import SyntheticClips
from stdit.data.video import to_uint8
from stdit.eval_measure import (accuracies, check, condition_metrics, format_caption, loop_closure, measure,
                                parse_caption, score_clip)
from stdit.evaluate import (DEFAULT_MODES, MODES, chunk_spans, clip_frames, held_out_clips, mode_case, mode_clips,
                            score_long_mode, training_window)
from stdit.train import Trainer

FAST = ["model.hidden_size=32", "model.depth=1", "data.resolutions=[[8,8],[8,16],[16,8]]", "data.frame_counts=[1,2,4]",
        "data.batch_size=4", "data.micro_batches=0", "data.token_budget=128", "data.num_samples=64",
        "text.hidden_size=16",
        "text.num_layers=1", "text.ff_size=32", "run.samples_at_end=0", "run.log_every=1", "optim.warmup_steps=2"]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
MEASURES = ("background", "object_colour", "direction", "shape")
SHORT = ("t2v", "t2i", "i2v", "extend_forward", "extend_backward", "loop", "connect", "keyframes", "edit")
LONG = ("long_autoregressive", "long_long_range", "long_hierarchical")


@pytest.fixture(scope="module")
def clips():
    """120 dataset clips of the demo's sizes (16-24 px) and frame counts (1, 4, 8)."""
    data = SyntheticClips(120, [(16, 16), (16, 24), (24, 16), (24, 24)], [1, 4, 8], [8.0], seed=3)
    return [data[i] for i in range(len(data))]


@pytest.fixture(scope="module")
def measured(clips):
    """Each clip read once (the slow part), then checked against its own and against shuffled captions."""
    return [measure(c.video) for c in clips]


def _acc(records) -> dict:
    return {k: v["accuracy"] for k, v in accuracies(records).items()}


def test_evaluator_reads_the_datasets_own_clips(clips, measured):
    acc = _acc([check(got, c.caption) for got, c in zip(measured, clips)])
    assert min(acc["background"], acc["object_colour"], acc["direction"]) >= 0.95, acc
    # shape is ambiguous for the smallest shapes (a 5-pixel diamond can be a 5-pixel circle): ~94% at 16-24 px
    assert acc["shape"] >= 0.85, acc
    big = SyntheticClips(12, [(48, 48)], [4], [8.0], seed=5)
    assert all(score_clip(big[i].video, big[i].caption)["shape_ok"] for i in range(len(big)))


def test_evaluator_is_near_chance_with_shuffled_captions(clips, measured):
    """Checked against 10 shufflings of the captions (pooled, so the figures are close to their expectation: the
    chance levels 10%, 11%, 25%, 25%)."""
    captions, records = [c.caption for c in clips], []
    for k in range(10):
        random.Random(k).shuffle(captions)
        records += [check(got, caption) for got, caption in zip(measured, captions)]
    acc = _acc(records)
    assert all(acc[k] <= 0.35 for k in MEASURES), acc


def test_evaluator_reads_round_trips_and_each_mode_draws_its_clips():
    """Out-and-back clips read as "DIR and back" (one-way ones of the same world as DIR), near chance shuffled; a
    run whose world has round trips is asked loops of round trips only, long videos of one-way clips only."""
    data = SyntheticClips(80, [(16, 16), (16, 24), (24, 16)], [4, 8, 16], [8.0], seed=6, round_trips=0.5)
    clips = [data[i] for i in range(len(data))]
    got = [measure(c.video) for c in clips]
    assert 20 < sum(" and back " in c.caption for c in clips) < 60
    assert _acc([check(g, c.caption) for g, c in zip(got, clips)])["direction"] >= 0.95
    captions = [c.caption for c in clips]
    random.Random(0).shuffle(captions)
    assert _acc([check(g, c) for g, c in zip(got, captions)])["direction"] <= 0.3
    cfg = load_config("recipes/tiny_long.yaml")
    assert cfg.data.round_trips > 0
    back = lambda mode: [" and back " in c.caption for c in mode_clips(cfg, mode, 16, 0, 8)]  # noqa: E731
    assert all(back("loop")) and not any(back("long_hierarchical")) and 0 < sum(back("t2v")) < 16
    assert all("moving" not in c.caption for c in mode_clips(cfg, "t2i", 4, 0, 8))


def test_measure_takes_uint8_frames_and_skips_frames(clips):
    clip = next(c for c in clips if c.video.shape[1] == 8)
    got = measure(clip.video)
    assert {k: got[k] for k in ("bg", "fg", "direction")} == \
        {k: measure(to_uint8(clip.video))[k] for k in ("bg", "fg", "direction")}
    assert score_clip(to_uint8(clip.video), clip.caption)["direction_ok"] is True
    skip = torch.arange(8) < 5  # the last 3 frames alone still show the motion; skipped frames have no track
    later = measure(clip.video, skip)
    assert later["direction"] == got["direction"] and later["track"][:5] == [None] * 5
    assert measure(clip.video, torch.arange(8) != 7)["direction"] is None  # one frame read: no motion


def test_parse_caption_round_trips(clips):
    for c in clips:
        assert format_caption(**parse_caption(c.caption)) == c.caption
    assert parse_caption("an orange circle on a red background") == \
        {"fg": "orange", "shape": "circle", "direction": None, "bg": "red"}
    assert parse_caption(" a red square moving left on a blue background\n")["direction"] == "left"
    for bad in ("a red hexagon on a blue background", "a red square moving sideways on a blue background",
                "a pink square on a blue background", "red square on blue", ""):
        with pytest.raises(ValueError, match="synthetic grammar"):
            parse_caption(bad)


def _cut(a, b, frames):
    """a's frames where `frames` is True, b's elsewhere: a hard cut at every boundary."""
    return torch.where(frames[None, :, None, None], a, b)


def test_condition_metrics_on_constructed_clips(clips):
    """A real clip 'generated' around its own given frames (i2v, backward extension, connect, keyframes) keeps them
    exactly and each boundary is an ordinary step (ratio ~1); a clip whose given frames come from a clip of another
    caption has a hard cut there (ratio >> 1)."""
    eight = [c for c in clips if c.video.shape[1] == 8]
    masks = {"i2v": torch.arange(8) < 1, "extend_backward": torch.arange(8) >= 6,
             "connect": (torch.arange(8) < 2) | (torch.arange(8) >= 6), "keyframes": torch.isin(torch.arange(8),
                                                                                               torch.tensor([2, 6]))}
    for name, given in masks.items():
        ratios, cuts = [], []
        for a, b in zip(eight, eight[1:]):
            m = condition_metrics(a.video, a.video, given)
            assert m["kept"] == 0
            ratios.append(m["jump_ratio"])
            if a.video.shape == b.video.shape and parse_caption(a.caption)["bg"] != parse_caption(b.caption)["bg"]:
                cut = condition_metrics(_cut(b.video, a.video, given), b.video, given)
                assert cut["kept"] == 0
                cuts.append(cut["jump_ratio"])
        assert 0.7 <= sorted(ratios)[len(ratios) // 2] <= 1.3, (name, ratios)
        assert cuts and min(cuts) > 3, (name, cuts)
    still = torch.zeros(3, 4, 8, 8)  # a seam: given frames of one colour, generated ones of another
    still[:, 2:] = 1
    m = condition_metrics(still, still, torch.arange(4) < 2)
    assert m["jump"] == 1.0 and m["typical"] == 0 and m["jump_ratio"] is None


def test_loop_closure_on_constructed_clips(clips):
    """A periodic clip (forth then back: 0..7, 6..1) closes with an ordinary step; a one-way clip jumps back."""
    closures, one_way = [], []
    for c in clips:
        if c.video.shape[1] == 8:
            periodic = torch.cat([c.video, c.video.flip(1)[:, 1:-1]], 1)  # 14 frames; after frame 1 comes 0
            given = torch.arange(14) < 1
            closures.append(loop_closure(periodic, given)["closure_ratio"])
            one_way.append(loop_closure(c.video, given[:8])["closure_ratio"])
    assert 0.7 <= sorted(closures)[len(closures) // 2] <= 1.3, closures
    assert sorted(one_way)[len(one_way) // 2] > 3, one_way
    assert loop_closure(torch.zeros(3, 4, 8, 8))["closure_ratio"] is None  # nothing moves: no ratio


def test_long_video_scoring_on_constructed_clips():
    """Long clips made of one caption's clip 4 times score 100% chunk by chunk; with a chunk of another caption
    spliced in, that clip is no longer right over its whole length."""
    data = SyntheticClips(6, [(48, 48)], [8], [8.0], seed=11)
    a, b = data[0], next(data[i] for i in range(1, 6) if parse_caption(data[i].caption)["bg"] !=
                         parse_caption(data[0].caption)["bg"])
    long_a = a.video.repeat(1, 4, 1, 1)  # 32 frames: 4 chunks of the 8-frame window
    spans = chunk_spans(32, 8)
    assert spans == [(0, 8), (8, 16), (16, 24), (24, 32)]
    r = score_long_mode([a.caption], [long_a], spans)
    assert all(r["accuracy"][k]["accuracy"] == 1.0 for k in MEASURES), r["accuracy"]
    assert r["whole_length"] == 1.0 and r["chunks"] == 4 and r["right_by_chunk"] == [1.0] * 4
    spliced = long_a.clone()
    spliced[:, 16:24] = b.video
    r = score_long_mode([a.caption, a.caption], [long_a, spliced], spans)
    assert r["whole_length"] == 0.5 and r["right_by_chunk"] == [1.0, 1.0, 0.5, 1.0]
    assert r["accuracy"]["background"]["accuracy"] == 7 / 8 and r["clips"][1]["right"] == [True, True, False, True]
    # with the causal autoencoder (4x in time) chunks of latent frames map to the pixel frames they decode to
    assert chunk_spans(6, 3, 4) == [(0, 9), (9, 21)] and chunk_spans(5, 3, 4) == [(0, 9), (9, 17)]


def test_every_mode_gives_the_held_out_clips_frames():
    """Which frames each short mode gives (8-frame clips, pixel space), taken from the held-out clip itself at their
    own times, as clean token frames of the condition; edit starts from a clip that differs in every attribute; a
    causal model refuses modes that give later frames."""
    cfg = load_config("recipes/tiny.yaml")
    assert training_window(cfg) == 8 and clip_frames(cfg) == 8
    clips = held_out_clips(cfg, 3, 0, 8)
    expected = {"t2v": None, "i2v": [0], "extend_forward": [0, 1], "extend_backward": [6, 7], "connect": [0, 1, 6, 7],
                "keyframes": [2, 6], "loop": [0], "edit": None}
    for i, c in enumerate(clips):
        for mode, frames in expected.items():
            case = mode_case(mode, c, cfg, index=i)
            if frames is None:
                assert case.given is None and case.condition is None
                continue
            assert case.given.nonzero().flatten().tolist() == frames
            clean, mask = case.condition
            assert torch.equal(clean[:, frames], c.video[:, frames])
            assert mask.nonzero().flatten().tolist() == (frames + [8] if mode == "loop" else frames)
        loop = mode_case("loop", c, cfg)
        assert loop.frames == 9 and torch.equal(loop.condition[0][:, 8], c.video[:, 0])  # the end leads into the start
        edit = mode_case("edit", c, cfg, seed=0, index=i)
        want, got = parse_caption(c.caption), parse_caption(edit.source)
        assert edit.edit.shape == c.video.shape and all(want[k] != got[k] for k in want)
    causal = load_config("recipes/tiny.yaml", ["model.temporal_causal=true", "model.attention=factorized"])
    mode_case("extend_forward", clips[0], causal)
    for mode in ("extend_backward", "connect", "keyframes", "loop"):
        with pytest.raises(ValueError, match="causal in time"):
            mode_case(mode, clips[0], causal)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A 2-step tiny run (4-frame clips: window 4) evaluated by the command line in every mode, 2 clips each, long
    videos at 1x and 2x the window: (output dir, printed tables)."""
    run, out = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("eval") / "out"
    Trainer(load_config("recipes/tiny.yaml", FAST + ["run.steps=2", f"run.dir={run}"])).train()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli_main(["eval", "--run", str(run), "--out", str(out), "--modes", "all", "--n", "2", "--long-n", "2",
                  "--long-factors", "1,2", "--steps", "2", "--device", "cpu"])
    return out, printed.getvalue()


def test_eval_command_writes_every_output(evaluated):
    out, printed = evaluated
    results = json.loads((out / "results.json").read_text())
    assert {"run", "checkpoint", "step", "steps", "cfg_scale", "seed", "modes", "long", "window"} <= set(results)
    assert results["step"] == 2 and results["window"] == 4 and not results["skipped"]
    assert list(results["modes"]) == list(SHORT) and list(results["long"]) == list(LONG)
    assert tuple(MODES) == SHORT + LONG and DEFAULT_MODES == ("t2v", "t2i", "i2v")
    given = {"i2v": [0], "extend_forward": [0], "extend_backward": [3], "loop": [0], "connect": [0, 3],
             "keyframes": [1, 3]}
    for name, r in results["modes"].items():
        assert r["n"] == 2 and len(r["clips"]) == 2 and set(MEASURES) <= set(r["accuracy"])
        assert r["chance"]["background"] == 0.1 and r["chance"]["direction"] == 0.25
        if name in given:  # pixel space: the given frames come out exactly
            assert r["kept_max_abs_error"] == 0 and {"jump_ratio_median", "jump_within_target"} <= set(r)
            assert all(c["given_frames"] == given[name] and c["kept"] == 0 for c in r["clips"])
        else:
            assert "kept_max_abs_error" not in r
        with Image.open(out / f"contact_{name}.png") as sheet:
            assert sheet.width > 100 and sheet.height > 2 * 32
    assert results["modes"]["t2i"]["accuracy"]["direction"]["accuracy"] is None  # stills have no motion
    assert results["modes"]["loop"]["closure_ratio_median"] is not None
    assert all(c["closure_ratio"] is not None for c in results["modes"]["loop"]["clips"])
    edit = results["modes"]["edit"]
    assert set(MEASURES) <= set(edit["source_accuracy"]) and all(c["source"] != c["caption"] for c in edit["clips"])
    for name, by_length in results["long"].items():
        assert list(by_length) == ["1x", "2x"]
        for f, r in zip((1, 2), by_length.values()):
            assert r["scheme"] == name[len("long_"):] and r["length"] == r["frames"] == 4 * f and r["chunks"] == f
            assert r["n"] == 2 and len(r["right_by_chunk"]) == f and 0 <= r["whole_length"] <= 1
            assert all(len(c["chunks"]) == f for c in r["clips"])
            with Image.open(out / f"contact_{name}_{f}x.png") as sheet:
                assert sheet.height > 2 * 32
    table = (out / "results.md").read_text()
    assert table in printed and "| chance |" in table
    lines = table.splitlines()
    assert sum(line.startswith("| ") for line in lines) == 1 + 9 + 1 + 1 + 6  # the two tables' headers and rows
    assert sum(line.startswith(("| autoregressive", "| long_range", "| hierarchical")) for line in lines) == 6
    assert "edit (strength 0.7)" in table
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "report.html").is_file()


def test_eval_command_options(tmp_path, capsys):
    for argv, message in ((["--modes", "t2v,v2v"], "unknown mode(s) v2v"),
                          (["--long-factors", "2,x"], "--long-factors must be"),
                          (["--strength", "0"], "--strength must be in (0, 1]")):
        with pytest.raises(SystemExit) as e:
            cli_main(["eval", "--run", str(tmp_path), "--out", str(tmp_path / "o")] + argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["eval", "--help"])
    assert "or all (default t2v,t2i,i2v)" in " ".join(capsys.readouterr().out.split())


def test_report_html_renders_in_headless_chromium(evaluated):
    """The static page opened from disk in a real browser: both tables and every contact sheet rendered."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; the test uses the system chromium)")
    if not CHROMIUM.is_file():
        pytest.skip(f"no {CHROMIUM} (Debian: apt-get install chromium)")
    out, _ = evaluated
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        except Error as e:
            pytest.skip(f"{CHROMIUM} cannot start here: {str(e).splitlines()[0]}")
        try:
            page = browser.new_page()
            page.goto((out / "report.html").resolve().as_uri())
            page.wait_for_load_state("load")
            assert page.locator("#results tbody tr").count() == 10  # 9 modes, chance
            assert page.locator("#long tbody tr").count() == 6  # 3 schemes x 2 lengths
            assert page.locator("#results th").first.inner_text() == "mode"
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            assert len(widths) == 9 + 6 and min(widths) > 0, widths
            table, image = page.locator("#results").bounding_box(), page.locator("img").first.bounding_box()
            assert table["width"] > 0 and image["x"] >= table["x"] + table["width"]  # beside the table
        finally:
            browser.close()
