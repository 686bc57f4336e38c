"""heiindex.train and ``heiindex train``: the hinge loss, batches, best/last folders, resume,
determinism, and a trained model that beats chance on the tiny learnable set."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pipeline_fixtures as pf  # tests/ is on sys.path (pytest rootdir-relative import)
import pyarrow.parquet as pq
import pytest
import torch
from cli_helpers import clean_error, ok, run  # tests/ is on sys.path (pytest rootdir-relative import)

from heiindex.attention import AttentionConfig
from heiindex.checkpoint import load_model, model_checksum
from heiindex.encode import encode_split
from heiindex.errors import DataError, HeiindexError, HeiindexWarning
from heiindex.scoring import evaluate_exhaustive, exhaustive_scores
from heiindex.settings import SettingError
from heiindex.store import SplitStore
from heiindex.train import TrainConfig, contrastive_loss, iter_training_batches, train
from heiindex.vocab import Vocab


@pytest.fixture(scope="session")
def wide_store(tmp_path_factory):
    return pf.get_wide_store(tmp_path_factory)


def _vocab_size(root) -> int:
    return len(Vocab.load(root / "vocab.json"))


# -- the loss ---------------------------------------------------------------------------------

# scores[i, j]: caption i against the image of caption j; the diagonal holds the positives.
S = torch.tensor(
    [
        [0.90, 0.30, 0.60],
        [0.85, 0.80, 0.75],
        [0.20, 0.65, 0.70],
    ],
    dtype=torch.float64,
)
# margin 0.2; positives 0.9, 0.8, 0.7.
# Images (columns) against negative captions: col 0: 0.15 (cap 1), 0 (cap 2); col 1: 0 (cap 0),
#   0.05 (cap 2); col 2: 0.1 (cap 0), 0.25 (cap 1).
# Captions (rows) against negative images: row 0: 0, 0; row 1: 0.25 (img 0), 0.15 (img 2);
#   row 2: 0 (img 0), 0.15 (img 1).


def test_contrastive_loss_max_violation_exact():
    # hardest per image 0.15 + 0.05 + 0.25, hardest per caption 0 + 0.25 + 0.15
    got = contrastive_loss(S, torch.tensor([0, 1, 2]), margin=0.2, max_violation=True)
    assert float(got) == pytest.approx(0.85, abs=1e-12)


def test_contrastive_loss_sum_exact():
    # every violation: 0.15 + 0.05 + 0.1 + 0.25 + 0.25 + 0.15 + 0.15
    got = contrastive_loss(S, torch.tensor([0, 1, 2]), margin=0.2, max_violation=False)
    assert float(got) == pytest.approx(1.1, abs=1e-12)


@pytest.mark.parametrize("max_violation, want", [(True, 0.6), (False, 0.7)])
def test_contrastive_loss_never_uses_the_same_image_as_negative(max_violation, want):
    # captions 0 and 1 describe the same image: the pairs (0, 1) and (1, 0), violations of 0.15
    # and 0.25 with distinct ids, are not negatives any more
    got = contrastive_loss(S, torch.tensor([4, 4, 9]), margin=0.2, max_violation=max_violation)
    assert float(got) == pytest.approx(want, abs=1e-12)


def test_contrastive_loss_zero_when_positives_win_by_the_margin():
    s = torch.tensor([[1.0, 0.5], [0.7, 1.0]], dtype=torch.float64)
    assert float(contrastive_loss(s, torch.tensor([0, 1]), 0.2, True)) == 0.0
    # margin 0.4: caption 1 vs image 0 violates by 0.1 in both directions
    assert float(contrastive_loss(s, torch.tensor([0, 1]), 0.4, True)) == pytest.approx(0.2, abs=1e-12)


def test_contrastive_loss_gradient_reaches_only_the_hardest_negatives():
    s = S.clone().requires_grad_(True)
    contrastive_loss(s, torch.tensor([0, 1, 2]), 0.2, True).backward()
    # hardest captions of images 0, 1, 2: s10, s21, s12 (+1 each, -1 on s00, s11, s22);
    # hardest images of captions 1, 2: s10, s21 (+1 each, -1 on s11, s22); caption 0 has none.
    want = torch.tensor(
        [
            [-1.0, 0.0, 0.0],
            [2.0, -2.0, 1.0],
            [0.0, 2.0, -2.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(s.grad, want, atol=0, rtol=0)


# -- batches ----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [16, 319])  # 319: one caption of 320 left over, joins the last batch
def test_training_batches_cover_every_caption_once_with_its_image(pipe, batch):
    store = SplitStore.open(pipe.root, "train")
    caps = store.captions()
    all_feats = np.concatenate([f for _, f in store.iter_image_blocks()])
    seen = []
    assert store.n_row_groups <= 8  # one buffer holds every caption
    for feats, tok, lens, img, rows in iter_training_batches(store, caps, batch, np.random.default_rng(3), 8):
        assert 2 <= len(lens) <= batch + 1
        np.testing.assert_array_equal(feats, all_feats[img])
        # the caption rows given are those of the batch's tokens, lengths and images
        np.testing.assert_array_equal(tok, caps.tokens[rows])
        np.testing.assert_array_equal(lens, caps.lengths[rows])
        np.testing.assert_array_equal(img, caps.image_ids[rows])
        seen += rows.tolist()
    assert len(seen) == store.n_captions == 320
    assert sorted(seen) == list(range(320))


def test_training_batches_pair_captions_with_their_images_whatever_the_ids():
    """Ids are int64: a negative one was wrapped onto another image's row (a lookup table
    indexed by id), so its captions trained against that image's features."""
    ids = np.array([-1, 7, 2, 30])
    feats = np.array([10.0, 11.0, 12.0, 13.0], dtype=np.float32).reshape(4, 1, 1)  # row r holds 10 + r
    store = SimpleNamespace(n_row_groups=1, read_row_group=lambda g: (ids, feats))
    image_ids = np.array([-1, -1, 7, 2, 30, 30])
    caps = SimpleNamespace(image_ids=image_ids, tokens=np.zeros((6, 3), np.int64), lengths=np.full(6, 3))
    got = {}
    for f, _, _, img, _ in iter_training_batches(store, caps, 8, np.random.default_rng(0), 4):
        got.update(zip(img.tolist(), f[:, 0, 0].tolist(), strict=True))
    assert got == {-1: 10.0, 7: 11.0, 2: 12.0, 30: 13.0}


def test_training_refuses_repeated_ids_before_any_epoch(pipe, tmp_path, monkeypatch):
    import heiindex.train as tr

    pf.forbid(monkeypatch, "an epoch began", (tr, "iter_training_batches"))
    root = pf.copy_store(pipe, tmp_path)
    ids = pf.edit_column(root / "train" / "captions.parquet", "caption_id", lambda ids: ids.__setitem__(5, ids[9]))
    cfg = pf.model_config(_vocab_size(pipe.root))
    with pytest.raises(DataError, match=rf'train/captions.parquet: column "caption_id" repeats 1 ids \({ids[9]}\)'):
        train(root, tmp_path / "r", cfg, pf.train_config(epochs=1), log=pf.quiet)
    shutil.copy(pipe.root / "train" / "captions.parquet", root / "train" / "captions.parquet")
    pf.record_again(root / "train" / "captions.parquet")
    # the dev split: a repeated image id left one row without captions, refused only after an epoch
    ids = pf.edit_column(root / "dev" / "images.parquet", "image_id", lambda ids: ids.__setitem__(1, ids[0]))
    with pytest.raises(DataError, match=rf'dev/images.parquet: column "image_id" repeats 1 ids \({ids[0]}\)'):
        train(root, tmp_path / "r", cfg, pf.train_config(epochs=1), log=pf.quiet)
    shutil.copy(pipe.root / "dev" / "images.parquet", root / "dev" / "images.parquet")
    pf.record_again(root / "dev" / "images.parquet")
    # a dev image without a caption: recall would count it a miss (unless --val-images leaves it out)
    dev_ids = pq.read_table(root / "dev" / "images.parquet", columns=["image_id"]).column("image_id").to_numpy()
    path = root / "dev" / "captions.parquet"
    pf.edit_column(path, "image_id", lambda ids: ids.__setitem__(ids == dev_ids[-1], dev_ids[0]))  # the last one bare
    with pytest.raises(
        DataError,
        match=rf"dev/captions.parquet: 1 of the 24 images evaluated have no caption \(image_id {dev_ids[-1]}\)",
    ):
        train(root, tmp_path / "r", cfg, pf.train_config(epochs=1), log=pf.quiet)
    with pytest.raises(pytest.fail.Exception, match="an epoch began"):  # the first 23 only: accepted
        train(root, tmp_path / "r", cfg, pf.train_config(epochs=1, val_images=23), log=pf.quiet)
    assert not (tmp_path / "r").exists()


# -- training on the tiny set -----------------------------------------------------------------


def test_training_beats_chance_and_keeps_the_best_epoch(pipe):
    h = pipe.train_history
    assert [r["epoch"] for r in h] == list(range(1, pf.TRAIN_EPOCHS + 1))
    assert h[-1]["loss"] < h[0]["loss"] / 2
    best = max(range(len(h)), key=lambda i: (h[i]["dev_rsum"], -i))
    info = load_model(pipe.model_dir).info
    assert info["epoch"] == best + 1
    assert info["dev"]["rsum"] == h[best]["dev_rsum"]
    assert json.loads((pipe.run_dir / "history.json").read_text()) == h
    # chance on 24 images is a t2i rsum of about 67 and an i2t rsum of about 70 (5 captions each)
    matcher = load_model(pipe.model_dir)
    res = evaluate_exhaustive(matcher.model, encode_split(matcher.model, SplitStore.open(pipe.root, "test")))
    assert res.rsum > 180, res
    assert res.t2i.r10 > 45  # chance: 41.7


def test_best_model_reproduces_its_recorded_dev_metrics(pipe):
    matcher = load_model(pipe.model_dir)
    assert matcher.info["dev"]["images"] == pf.SPLIT_IMAGES["dev"] == 24  # those used, not --val-images 1000
    res = evaluate_exhaustive(matcher.model, encode_split(matcher.model, SplitStore.open(pipe.root, "dev")))
    assert res.t2i.to_dict() == matcher.info["dev"]["t2i"]
    assert res.i2t.to_dict() == matcher.info["dev"]["i2t"]


def test_same_seed_same_weights_other_seed_other_weights(pipe, tmp_path):
    vs = _vocab_size(pipe.root)
    sums = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        train(pipe.root, tmp_path / name, pf.model_config(vs), pf.train_config(epochs=1, seed=seed), log=pf.quiet)
        sums.append(load_model(tmp_path / name / "last").checksum)
    assert sums[0] == sums[1]
    assert sums[0] != sums[2]


def test_resume_equals_an_uninterrupted_run(pipe, tmp_path):
    vs = _vocab_size(pipe.root)
    cfg = pf.model_config(vs)
    straight = train(pipe.root, tmp_path / "s", cfg, pf.train_config(epochs=2, seed=5), log=pf.quiet)
    train(pipe.root, tmp_path / "r", cfg, pf.train_config(epochs=1, seed=5), log=pf.quiet)
    logs = []
    resumed = train(pipe.root, tmp_path / "r", None, pf.train_config(epochs=2, seed=5), resume=True, log=logs.append)
    assert logs[0].startswith("resuming after epoch 1")
    logs = []  # nothing to resume: said, then a fresh run
    train(pipe.root, tmp_path / "n", cfg, pf.train_config(epochs=1, seed=5), resume=True, log=logs.append)
    assert logs[0] == f"nothing to resume in {tmp_path / 'n' / 'last'}: training from the first epoch"
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert load_model(tmp_path / "r" / "last").checksum == load_model(tmp_path / "s" / "last").checksum
    for a, b in zip(straight.history, resumed.history, strict=True):
        assert a["loss"] == b["loss"] and a["dev_rsum"] == b["dev_rsum"]


def test_resume_refuses_another_model_config(pipe, tmp_path):
    vs = _vocab_size(pipe.root)
    train(pipe.root, tmp_path / "r", pf.model_config(vs), pf.train_config(epochs=1), log=pf.quiet)
    changed = "embed_size 8 (it has 24); lambda_softmax 4.0 (it has 9.0)"
    with pytest.raises(
        DataError, match=f"r/last: cannot resume: its model config differs from the one given: {re.escape(changed)}$"
    ):
        train(
            pipe.root,
            tmp_path / "r",
            pf.model_config(vs, embed_size=8, attention=AttentionConfig(lambda_softmax=4.0)),
            pf.train_config(epochs=2),
            resume=True,
            log=pf.quiet,
        )


def test_training_stops_when_the_loss_is_not_finite_and_keeps_the_epochs_before(pipe, tmp_path, monkeypatch):
    """A diverged run went on with NaN weights, and NaN scores ranked every caption's image first:
    it was saved as the best model."""
    import heiindex.train as tr

    evaluated = []
    real_loss, real_eval = tr.contrastive_loss, tr.evaluate_exhaustive
    monkeypatch.setattr(tr, "evaluate_exhaustive", lambda *a: evaluated.append(1) or real_eval(*a))
    monkeypatch.setattr(tr, "contrastive_loss", lambda *a: real_loss(*a) * (float("inf") if evaluated else 1.0))
    first = tmp_path / "first"
    with monkeypatch.context() as m:  # diverged in the first epoch: no folder is left behind
        m.setattr(tr, "contrastive_loss", lambda *a: real_loss(*a) * float("nan"))
        with pytest.raises(HeiindexError, match=r"^training diverged: the loss is nan at epoch 1, batch 1"):
            train(pipe.root, first, pf.model_config(_vocab_size(pipe.root)), pf.train_config(epochs=3), log=pf.quiet)
    assert not first.exists()
    with monkeypatch.context() as m:  # a finite loss whose gradient is not: sqrt at 0, times abs' 0
        m.setattr(tr, "contrastive_loss", lambda s, *a: real_loss(s, *a) + torch.sqrt((s - s.detach()).abs().sum()))
        for clip in (2.0, 0.0):  # 0: no clipping, the norm is still checked
            with pytest.raises(
                HeiindexError, match=r"^training diverged: the gradient norm is nan at epoch 1, batch 1"
            ):
                cfg = pf.train_config(epochs=3, grad_clip=clip)
                train(pipe.root, first, pf.model_config(_vocab_size(pipe.root)), cfg, log=pf.quiet)
            assert not first.exists()
    out = tmp_path / "r"
    with pytest.raises(HeiindexError, match=r"^training diverged: the loss is inf at epoch 2, batch 1; .*r/best and"):
        train(pipe.root, out, pf.model_config(_vocab_size(pipe.root)), pf.train_config(epochs=3), log=pf.quiet)
    assert [row["epoch"] for row in json.loads((out / "history.json").read_text())] == [1]
    for folder in ("best", "last"):
        assert load_model(out / folder).info["epoch"] == 1  # finite weights: load_model refuses NaN


def test_train_refuses_a_model_of_another_vocabulary_size(pipe, tmp_path):
    with pytest.raises(DataError, match=r"\d+ words, the model expects 7"):
        train(pipe.root, tmp_path / "x", pf.model_config(7), pf.train_config(epochs=1), log=pf.quiet)


# -- the command ------------------------------------------------------------------------------


def _cli_train(store, out, *extra):
    small = ("--batch-size", 16, "--lr", 0.01, "--embed-size", 16, "--val-images", 100)
    return run("train", "--store", store, "--out", out, *small, *extra)


def test_train_and_the_command_name_lr_val_images_and_resume_each_their_own_way(
    pipe, wide_store, tmp_path, monkeypatch
):
    """A refusal or warning that points to a setting names it as ``train`` takes it (`lr`, a
    ``TrainConfig`` field; `resume`), and the command line by its flag (--lr, --resume)."""
    from dataclasses import replace

    import heiindex.train as tr

    real_loss, model = tr.contrastive_loss, pf.model_config(_vocab_size(pipe.root))
    with monkeypatch.context() as m:
        m.setattr(tr, "contrastive_loss", lambda *a: real_loss(*a) * float("nan"))
        with pytest.raises(HeiindexError, match=r"^training diverged: .* \(a lower `lr` may help\)$"):
            train(pipe.root, tmp_path / "a", model, pf.train_config(epochs=1), log=pf.quiet)
        clean_error(_cli_train(wide_store, tmp_path / "a", "--epochs", "1"), "(a lower --lr may help)")
    too_few = "too few to choose the best epoch; give a {} of at least 2"
    with pytest.raises(HeiindexError, match=re.escape(too_few.format("`val_images`")) + "$"):
        train(pipe.root, tmp_path / "b", model, pf.train_config(epochs=1, val_images=1), log=pf.quiet)
    clean_error(
        _cli_train(wide_store, tmp_path / "b", "--epochs", "1", "--val-images", "1"), too_few.format("--val-images")
    )
    held = tmp_path / "held"  # a run's history, no last/: resuming would start again over it
    held.mkdir()
    (held / "history.json").write_text("[]")
    with pytest.raises(DataError, match=r"put its last/ back, or train without `resume` to start again$"):
        train(pipe.root, held, model, pf.train_config(epochs=1), resume=True, log=pf.quiet)
    r = _cli_train(wide_store, held, "--epochs", "1", "--resume")
    clean_error(r, "put its last/ back, or train without --resume to start again")
    with pytest.raises(DataError, match=r"cannot be resumed; train without `resume` to start again \(best/"):
        tr.read_state(held)
    # a resumed run validating on other dev images says so, naming the setting
    out = tmp_path / "run"
    ok(_cli_train(wide_store, out, "--epochs", "1"))
    with pytest.warns(HeiindexWarning, match=r"now validates on 5 \(`val_images`\): the best dev rsum so far"):
        train(wide_store, out, None, replace(TrainConfig.of_run(out), val_images=5), resume=True, log=pf.quiet)
    r = ok(_cli_train(wide_store, out, "--epochs", "1", "--resume", "--val-images", "5"))
    assert "Warning: the run in" in r.output and "now validates on 5 (--val-images): the best dev" in r.output
    # training over a run without resuming: `resume` from Python, --resume on the command line (it
    # said "resume=True, --resume on the command line" in both)
    with pytest.warns(HeiindexWarning, match=r"as it saves its first epoch \(`resume` goes on with it instead\)$"):
        train(wide_store, out, None, replace(TrainConfig.of_run(out), epochs=1), log=pf.quiet)
    r = ok(_cli_train(wide_store, out, "--epochs", "1"))
    assert "as it saves its first epoch (--resume goes on with it instead)" in r.output


def test_cli_train_one_epoch_then_resume(wide_store, tmp_path):
    out = tmp_path / "run"
    r = ok(_cli_train(wide_store, out, "--epochs", "1"))
    assert "epoch 1: loss" in r.output
    assert "best dev rsum" in r.output and str(out / "best") in r.output
    assert "at epoch 1; model in" in r.output  # epochs named counting from one
    for sub in ("best", "last"):
        assert {"config.json", "model.safetensors", "vocab.json"} <= {p.name for p in (out / sub).iterdir()}
    assert (out / "last" / "train_state.pt").exists()
    assert len(json.loads((out / "history.json").read_text())) == 1

    best, last = load_model(out / "best"), load_model(out / "last")
    assert best.model.config.embed_size == 16 and best.model.config.img_dim == pf.WIDE_FEATURE_DIM
    assert best.checksum == last.checksum  # one epoch: the best is the last
    dev = SplitStore.open(wide_store, "dev")
    enc_best = encode_split(best.model, dev)
    s_best = exhaustive_scores(best.model, enc_best)
    s_last = exhaustive_scores(last.model, encode_split(last.model, dev))
    np.testing.assert_array_equal(s_best, s_last)
    res = evaluate_exhaustive(best.model, enc_best)  # the metrics recorded while training, exactly
    assert res.t2i.to_dict() == best.info["dev"]["t2i"] and res.i2t.to_dict() == best.info["dev"]["i2t"]

    r2 = ok(_cli_train(wide_store, out, "--epochs", "2", "--resume"))
    assert "resuming after epoch 1" in r2.output
    assert "epoch 2: loss" in r2.output and "epoch 1: loss" not in r2.output
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    last2 = load_model(out / "last")
    assert last2.info["epoch"] == 2
    assert last2.checksum != last.checksum
    assert model_checksum(last2.model) == last2.checksum

    # An option that would change the saved model's shape is refused, not silently ignored.
    r3 = _cli_train(wide_store, out, "--epochs", "3", "--resume", "--embed-size", "32", "--agg", "mean")
    clean_error(
        r3, f"--resume continues the model in {out / 'last'}", "--embed-size 32 (it has 16); --agg mean (it has lse)"
    )
    assert load_model(out / "last").checksum == last2.checksum

    # Options left out go on as the run had them, not at the defaults (batch 128, lr 2e-4), and say so.
    r4 = ok(run("train", "--store", wide_store, "--out", out, "--epochs", "3", "--resume", "--lr", "0.005"))
    assert "resuming with the run's own --batch-size 16, --val-images 100 (give an option to change it)" in r4.output
    train_info = load_model(out / "last").info["train"]
    assert (train_info["batch_size"], train_info["lr"], train_info["val_images"], train_info["epochs"]) == (
        16,
        0.005,
        100,
        3,
    )
    # The same from Python: without a config, a resumed run goes on with its own (3 epochs: done),
    # not the defaults (8 epochs, batch 128); this was done by the CLI alone.
    run_config = TrainConfig.of_run(out)
    assert (run_config.batch_size, run_config.lr, run_config.epochs, run_config.threads) == (16, 0.005, 3, None)
    # overridden where given, the run's own elsewhere (what the CLI resumes with)
    assert TrainConfig.of_run(out, epochs=5, lr=0.01) == replace(run_config, epochs=5, lr=0.01)
    with pytest.raises(SettingError, match="lr must be .*at most 1, got 2.0"):
        TrainConfig.of_run(out, lr=2.0)
    said, before = [], load_model(out / "last").checksum
    train(wide_store, out, resume=True, log=said.append)
    assert said[-1] == "nothing left to train: the run has done 3 epochs of the 3 asked for (ask for more to go on)"
    assert load_model(out / "last").checksum == before
    # a config given replaces the run's settings: each one that differs is said (it was not)
    said = []
    train(wide_store, out, config=TrainConfig(epochs=3), resume=True, log=said.append)
    assert said[0] == (
        "resuming with settings other than the run's: batch_size 128 (it trained with 16), "
        "lr 0.0002 (it trained with 0.005), val_images 1000 (it trained with 100)"
    )
    with pytest.raises(DataError, match="no training run here"):
        TrainConfig.of_run(tmp_path / "nothing-here")


def test_resume_without_a_saved_state_starts_with_the_options_given(wide_store, tmp_path):
    """A last/ without a model in it (here empty) is nothing to resume: training starts fresh with
    the options given (the CLI and the library once disagreed on this, and --embed-size was
    dropped). A last/ holding a model but no state is refused (the test below)."""
    (tmp_path / "run" / "last").mkdir(parents=True)
    r = ok(_cli_train(wide_store, tmp_path / "run", "--epochs", "1", "--resume"))  # --embed-size 16 among the options
    assert "resuming" not in r.output
    assert load_model(tmp_path / "run" / "last").model.config.embed_size == 16


def test_resume_after_a_kill_between_the_first_best_and_last_starts_again(pipe, tmp_path, monkeypatch):
    """Epoch 1 saves best/ and then last/: a kill between the two leaves best/ alone, which is no
    run to keep (the README: --resume after a kill at any moment goes on from the last epoch
    saved, here none), so --resume starts at the first epoch."""
    import heiindex.train as train_module

    real = train_module.save_model

    def killed_at_last(model, vocab, folder, *args, **kwargs):
        if Path(folder).name == "last":
            raise KeyboardInterrupt
        return real(model, vocab, folder, *args, **kwargs)

    out, vs = tmp_path / "run", _vocab_size(pipe.root)
    with monkeypatch.context() as m:
        m.setattr(train_module, "save_model", killed_at_last)
        with pytest.raises(KeyboardInterrupt):
            train(pipe.root, out, pf.model_config(vs), pf.train_config(epochs=1), log=pf.quiet)
    assert sorted(p.name for p in out.iterdir()) == ["best"]
    res = train(pipe.root, out, pf.model_config(vs), pf.train_config(epochs=1), resume=True, log=pf.quiet)
    assert len(res.history) == 1 and (out / "last" / "config.json").is_file()


@pytest.mark.parametrize("damage", ["last_config", "last_folder", "last_emptied"])
def test_resume_refuses_a_run_whose_last_holds_no_model(wide_store, tmp_path, damage):
    """--resume where last/ lost its config.json, or was removed or emptied, but best/ and
    history.json are there: it said "nothing to resume", trained from the first epoch with the
    default settings and replaced a better best/. Refused now, by name, with nothing changed."""
    import shutil

    run_dir = tmp_path / "run"
    ok(_cli_train(wide_store, run_dir, "--epochs", "1"))
    if damage == "last_config":
        (run_dir / "last" / "config.json").unlink()
    else:
        shutil.rmtree(run_dir / "last")
        if damage == "last_emptied":
            (run_dir / "last").mkdir()
    before = (run_dir / "best" / "model.safetensors").read_bytes(), (run_dir / "history.json").read_text()
    r = _cli_train(wide_store, run_dir, "--epochs", "2", "--resume")
    clean_error(r, "last: holds no model to resume (config.json is missing), but")
    assert "epoch 1" not in r.output
    assert ((run_dir / "best" / "model.safetensors").read_bytes(), (run_dir / "history.json").read_text()) == before


def test_train_refuses_an_out_it_would_destroy(wide_store, tmp_path):
    a_file = tmp_path / "run.txt"
    a_file.write_text("keep")
    r = _cli_train(wide_store, a_file, "--epochs", "1")
    clean_error(r, "run.txt: exists and is not a folder")
    (tmp_path / "run" / "best").mkdir(parents=True)
    (tmp_path / "run" / "best" / "notes.txt").write_text("keep")
    r = _cli_train(wide_store, tmp_path / "run", "--epochs", "1")
    clean_error(r, "best: exists and holds what a model does not write (notes.txt)")
    assert "epoch 1" not in r.output  # refused before training
    assert a_file.read_text() == "keep" and (tmp_path / "run" / "best" / "notes.txt").read_text() == "keep"
    mine = tmp_path / "mine"  # a folder of the user's, or the input store root: not a run folder to write into
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for out in (mine, wide_store):
        r = _cli_train(wide_store, out, "--epochs", "1")
        clean_error(r, f"{out}: exists and holds what a training run does not write")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_a_run_folder_may_be_the_current_folder(pipe, tmp_path, monkeypatch):
    """A training run writes inside its folder (best/, last/, history.json), never swaps it whole:
    the refusal of the current folder that outputs swapped in whole get must not reach it."""
    import heiindex.train as train_module

    class Checked(Exception):
        pass

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)

    def reached(*args):
        raise Checked

    monkeypatch.setattr(train_module.SplitStore, "open", reached)
    with pytest.raises(Checked):  # past the output checks, at the first read of the store
        train(pipe.root, Path("."), pf.model_config(10), pf.train_config(epochs=1), log=pf.quiet)


def test_cli_train_uses_the_feature_size_of_the_store(pipe, tmp_path):
    """``heiindex ingest --feature-dim 32`` makes a valid store; ``heiindex train`` on it must build
    its matcher with img_dim 32 (the store's), not SCAN's 2048."""
    out = tmp_path / "run"
    ok(_cli_train(pipe.root, out, "--epochs", "1"))
    assert load_model(out / "best").model.config.img_dim == pf.FEATURE_DIM


def test_train_without_a_model_config_uses_the_stores_sizes(pipe, tmp_path):
    """The library as the CLI: train(root, out) with no model config took SCAN's img_dim 2048 and
    refused the store ("features have size 32, the model expects img_dim 2048")."""
    train(pipe.root, tmp_path / "run", None, pf.train_config(epochs=1), log=pf.quiet)
    config = load_model(tmp_path / "run" / "best").model.config
    assert (config.img_dim, config.vocab_size) == (pf.FEATURE_DIM, len(Vocab.load(pipe.root / "vocab.json")))


@pytest.mark.parametrize(
    "cross_attn, norm, embed_size", [("i2t", "clipped_l2norm", 16), ("i2t", "l2norm", 16), ("t2i", "clipped_l2norm", 1)]
)
def test_matchers_whose_norms_can_be_exactly_zero_train(pipe, tmp_path, cross_attn, norm, embed_size):
    """Regions attending over words, with an l2 norm over the regions: a padded word's column of
    similarities sums to 0, where sqrt's gradient is inf, and every i2t run diverged at its first
    batch ("the gradient norm is nan"), whatever the learning rate. With 1-d embeddings an
    attended context can be exactly 0 (+1 and -1 regions weighed alike): the same."""
    from heiindex.attention import AttentionConfig

    attention = AttentionConfig(cross_attn, norm, "mean", 5.0, 4.0)
    config = pf.model_config(_vocab_size(pipe.root), attention=attention, embed_size=embed_size)
    res = train(pipe.root, tmp_path / "run", config, pf.train_config(epochs=2), log=pf.quiet)
    assert all(np.isfinite(row["loss"]) for row in res.history) and len(res.history) == 2


def test_train_refuses_too_few_images_to_train_or_choose_on(pipe, tmp_path):
    """A 1-image train split trained on a loss of 0 every epoch; validating on 1 image (a
    1-image dev split, or val_images 1) scored rsum 600 every epoch. Both refused before any
    epoch, nothing written."""
    vs = _vocab_size(pipe.root)
    too_few = "^validating on 1 image of the dev split scores every epoch R@K 100: too few to choose the best epoch; "
    with pytest.raises(HeiindexError, match=too_few + "give a `val_images` of at least 2$"):
        train(pipe.root, tmp_path / "r", pf.model_config(vs), pf.train_config(val_images=1), log=pf.quiet)
    one = tmp_path / "one"
    captions = pf.write_learnable_precomp(one / "precomp", {"train": 1, "dev": 3})
    root = pf.ingest_all(one / "precomp", one / "store", captions)
    with pytest.raises(HeiindexError, match="^the train split has 1 image: a caption needs another image"):
        train(root, tmp_path / "r", None, pf.train_config(), log=pf.quiet)
    # a 1-image dev split: val_images cannot raise it, so the message offered it in vain
    captions = pf.write_learnable_precomp(one / "precomp1", {"train": 3, "dev": 1})
    root = pf.ingest_all(one / "precomp1", one / "store1", captions)
    with pytest.raises(HeiindexError, match=too_few + "give a larger dev split$"):
        train(root, tmp_path / "r", None, pf.train_config(val_images=2), log=pf.quiet)
    with pytest.raises(HeiindexError, match=too_few + "give a larger dev split, and a `val_images` of at least 2$"):
        train(root, tmp_path / "r", None, pf.train_config(val_images=1), log=pf.quiet)  # both: said at once
    assert not (tmp_path / "r").exists()


def test_one_train_at_a_time_writes_a_run_folder(pipe, tmp_path):
    """Two trains into one --out at once both finished, each reporting its own best while best/
    held the other's model. The second is refused while the first holds the folder's lock; a
    lock file a killed run left is taken (the system released its lock), and a finished run
    leaves none."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    vs = _vocab_size(pipe.root)
    with open(out / ".train.lock", "a") as held:  # another train, running
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DataError, match="another train is writing this run folder now"):
            train(pipe.root, out, pf.model_config(vs), pf.train_config(epochs=1), log=pf.quiet)
        assert sorted(p.name for p in out.iterdir()) == [".train.lock"]  # nothing written
    # the lock file of a run killed with SIGKILL stays; its lock does not
    train(pipe.root, out, pf.model_config(vs), pf.train_config(epochs=1), log=pf.quiet)
    assert sorted(p.name for p in out.iterdir()) == ["best", "history.json", "last"]


def test_a_refused_train_leaves_no_folder_it_made_and_runs_without_fcntl(pipe, tmp_path, monkeypatch):
    """The run folder and its missing parents are made for the lock and removed again where
    nothing was saved; where fcntl is missing (Windows) a run takes no lock but still runs."""
    import sys

    vs = _vocab_size(pipe.root)
    with pytest.raises(HeiindexError, match="validating on 1 image"):
        train(pipe.root, tmp_path / "a" / "b" / "run", pf.model_config(vs), pf.train_config(val_images=1), log=pf.quiet)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl: ImportError
    train(pipe.root, tmp_path / "run", pf.model_config(vs), pf.train_config(epochs=1), log=pf.quiet)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best", "history.json", "last"]


def test_cli_train_is_deterministic(wide_store, tmp_path):
    a = _cli_train(wide_store, tmp_path / "a", "--epochs", "1", "--seed", "2")
    b = _cli_train(wide_store, tmp_path / "b", "--epochs", "1", "--seed", "2")
    ok(a)
    ok(b)
    assert load_model(tmp_path / "a" / "last").checksum == load_model(tmp_path / "b" / "last").checksum
    assert torch.equal(
        load_model(tmp_path / "a" / "best").model.img_enc.fc.weight,
        load_model(tmp_path / "b" / "best").model.img_enc.fc.weight,
    )


def test_a_run_killed_after_saving_last_resumes_to_the_same_models(wide_store, tmp_path):
    """A real SIGKILL right after epoch 2's last/ was swapped in, before history.json was written
    (the optimizer state used to be written after that swap, so the new last/ had none and
    --resume trained again from the first epoch): the state and the history travel in last/, so
    --resume goes on with epoch 3 and ends with the models and history of a run never killed."""
    import subprocess
    import sys

    killed, whole = tmp_path / "killed", tmp_path / "whole"
    code = (
        "import os, signal, sys\n"
        "import torch\n"
        "torch.set_num_threads(1)  # as the tests run (conftest): the same sums, so the same weights\n"
        "import heiindex.train as t\n"
        "real = t.save_model\n"
        "def save(model, vocab, path, info, state=None):\n"
        "    real(model, vocab, path, info, state=state)\n"
        "    if path.name == 'last' and info['epoch'] == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "t.save_model = save\n"
        "from heiindex_cli.main import cli\n"
        "cli(sys.argv[1:])\n"
    )
    small = ["--batch-size", "16", "--lr", "0.01", "--embed-size", "16", "--val-images", "100"]
    args = ["train", "--store", str(wide_store), "--out", str(killed), *small, "--epochs", "3"]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr
    assert load_model(killed / "last").info["epoch"] == 2
    assert [row["epoch"] for row in json.loads((killed / "history.json").read_text())] == [1]

    r = ok(_cli_train(wide_store, killed, "--epochs", "3", "--resume"))
    assert "resuming after epoch 2" in r.output and "epoch 1: loss" not in r.output
    ok(_cli_train(wide_store, whole, "--epochs", "3"))
    for sub in ("best", "last"):
        assert load_model(killed / sub).checksum == load_model(whole / sub).checksum, sub
    rows = [json.loads((run_dir / "history.json").read_text()) for run_dir in (killed, whole)]
    assert [row["epoch"] for row in rows[0]] == [1, 2, 3]
    assert [row["dev_rsum"] for row in rows[0]] == [row["dev_rsum"] for row in rows[1]]


def test_resume_puts_back_a_last_that_a_kill_left_moved_aside(wide_store, tmp_path):
    """Where the one-step exchange is refused, a kill between the two renames of last/ leaves it
    moved aside as .last.old-HOST-NS-PID-...: --resume puts it back and goes on from it, instead
    of training again from the first epoch and replacing best/."""
    from heiindex import atomic

    out = tmp_path / "run"
    ok(_cli_train(wide_store, out, "--epochs", "1"))
    best = load_model(out / "best").checksum
    for folder in ("last", "best"):
        (out / folder).rename(out / f".{folder}.old-{atomic._HOST}-{atomic._NS}-{pf.dead_pid()}-abcd")
        r = ok(_cli_train(wide_store, out, "--epochs", "1", "--resume"))  # nothing left to train
        assert "resuming after epoch 1" in r.output and "epoch 1: loss" not in r.output
        assert "nothing left to train: the run has done 1 epoch of the 1 asked for (ask for more to go on)" in r.output
        assert sorted(p.name for p in out.iterdir()) == ["best", "history.json", "last"]
        assert load_model(out / "best").checksum == best

    # moved aside by a run in another container (same host name): maybe alive, so not put back
    # here; refused by name rather than trained again from the first epoch
    aside = out / f".last.old-{atomic._HOST}-1-7-abcd"
    (out / "last").rename(aside)
    r = _cli_train(wide_store, out, "--epochs", "2", "--resume")
    clean_error(r, f"{aside}: holds last/ as a run killed while replacing it left it", f"rename it to {out / 'last'}")
    assert "epoch 1: loss" not in r.output and load_model(out / "best").checksum == best


def test_resume_takes_the_history_from_last_and_refuses_a_missing_or_damaged_state(wide_store, tmp_path):
    """The history resumed is the one kept in last/'s state (history.json is a copy to read, here
    removed); a last/ whose state is missing, empty or cut short is refused by name instead of
    training again from the first epoch, which would replace best/."""
    out = tmp_path / "run"
    ok(_cli_train(wide_store, out, "--epochs", "1"))
    (out / "history.json").unlink()
    r = ok(_cli_train(wide_store, out, "--epochs", "2", "--resume"))
    assert [row["epoch"] for row in json.loads((out / "history.json").read_text())] == [1, 2]

    state = out / "last" / "train_state.pt"
    whole = state.read_bytes()
    best = load_model(out / "best").checksum
    for damage, expected in (
        (lambda: state.unlink(), "missing, so this run cannot be resumed"),
        (lambda: state.write_bytes(b""), "cannot be read (EOFError"),
        (lambda: state.write_bytes(whole[: len(whole) // 2]), "cannot be read (RuntimeError"),
    ):
        damage()
        r = _cli_train(wide_store, out, "--epochs", "3", "--resume")
        clean_error(r, f"{state}: {expected}", "train without --resume to start again")
        assert "epoch 1: loss" not in r.output and load_model(out / "best").checksum == best


def test_a_buffer_of_one_caption_gives_no_batch():
    store = SimpleNamespace(n_row_groups=1, read_row_group=lambda g: (np.array([5]), np.ones((1, 1, 1), np.float32)))
    caps = SimpleNamespace(image_ids=np.array([5]), tokens=np.zeros((1, 3), np.int64), lengths=np.array([3]))
    assert list(iter_training_batches(store, caps, 4, np.random.default_rng(0), 1)) == []


def test_a_batch_of_one_caption_is_refused():
    from heiindex.train import TrainConfig

    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=1)


def test_a_state_without_its_rng_is_refused(tmp_path):
    from heiindex.train import read_state

    torch.save({"epoch": 0, "optimizer": {}, "best_rsum": 1.0, "best_epoch": 0}, tmp_path / "train_state.pt")
    with pytest.raises(DataError, match="lacks torch_rng"):
        read_state(tmp_path)


@pytest.fixture(scope="module")
def spied_run(pipe, tmp_path_factory):
    """Two epochs, lr decayed after each, summed negatives in the first: what each step saw,
    keyed by the epoch counting from one (as the history names it)."""
    import heiindex.train as tr

    mp = pytest.MonkeyPatch()
    events = {"flags": {}, "losses": {}, "clip": [], "pairs": {}, "rows": []}
    orig_batches, orig_loss, orig_finite, orig_clip = (
        tr.iter_training_batches,
        tr.contrastive_loss,
        tr.finite_loss,
        torch.nn.utils.clip_grad_norm_,
    )

    def batches(*a, **kw):
        rows = []
        events["rows"].append(rows)
        for item in orig_batches(*a, **kw):
            rows.extend(item[4].tolist())
            yield item

    def loss(scores, ids, margin, max_violation):
        epoch = len(events["rows"])  # the epochs whose batches have begun: this one, counting from one
        events["flags"].setdefault(epoch, []).append(max_violation)
        events["pairs"][epoch] = events["pairs"].get(epoch, 0) + len(scores) ** 2
        return orig_loss(scores, ids, margin, max_violation)

    def finite(value, epoch, step, kept, what="the loss"):
        out = orig_finite(value, epoch, step, kept, what)
        if what == "the loss":
            events["losses"].setdefault(epoch + 1, []).append(out)  # train counts epochs from 0
        return out

    def clip(params, max_norm, *a, **kw):
        events["clip"].append(max_norm)
        return orig_clip(params, max_norm, *a, **kw)

    mp.setattr(tr, "iter_training_batches", batches)
    mp.setattr(tr, "contrastive_loss", loss)
    mp.setattr(tr, "finite_loss", finite)
    mp.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    try:
        vs = _vocab_size(pipe.root)
        cfg = pf.train_config(epochs=2, lr_decay_epochs=1, warmup_sum_epochs=1, grad_clip=1.5)
        res = tr.train(pipe.root, tmp_path_factory.mktemp("spied") / "run", pf.model_config(vs), cfg, log=pf.quiet)
    finally:
        mp.undo()
    return res, events


def test_lr_decays_after_lr_decay_epochs(spied_run):
    res, _ = spied_run
    assert [r["lr"] for r in res.history] == pytest.approx([pf.LR, pf.LR * 0.1])


def test_the_first_warmup_epoch_sums_and_the_next_takes_the_hardest(spied_run):
    _, ev = spied_run
    assert set(ev["flags"][1]) == {False} and set(ev["flags"][2]) == {True}


def test_the_loss_recorded_is_the_mean_of_the_epochs_batch_losses(spied_run):
    res, ev = spied_run
    for row, epoch in zip(res.history, (1, 2), strict=True):
        assert row["loss"] == pytest.approx(sum(ev["losses"][epoch]) / len(ev["losses"][epoch]), rel=1e-12)


def test_gradients_are_clipped_to_grad_clip(spied_run):
    _, ev = spied_run
    assert ev["clip"] and set(ev["clip"]) == {1.5}


def test_pairs_per_second_counts_b_squared_pairs_a_batch(spied_run):
    res, ev = spied_run
    for row, epoch in zip(res.history, (1, 2), strict=True):
        assert row["pairs_per_second"] * row["train_seconds"] == pytest.approx(ev["pairs"][epoch], rel=1e-9)


def test_each_epoch_shuffles_the_captions_anew(spied_run):
    _, ev = spied_run
    first, second = ev["rows"]
    assert sorted(first) == sorted(second) and first != second


def test_an_epoch_that_only_ties_the_best_does_not_replace_it(pipe, tmp_path):
    vs = _vocab_size(pipe.root)
    res = train(pipe.root, tmp_path / "r", pf.model_config(vs), pf.train_config(epochs=2, lr=1e-30), log=pf.quiet)
    assert res.history[0]["dev_rsum"] == res.history[1]["dev_rsum"]  # nothing learnt: a tie
    assert res.best_epoch == 0
    assert load_model(tmp_path / "r" / "best").info["epoch"] == 1


def test_a_state_without_history_resumes_with_the_saved_epochs(pipe, tmp_path):
    vs = _vocab_size(pipe.root)
    cfg = pf.model_config(vs)
    train(pipe.root, tmp_path / "r", cfg, pf.train_config(epochs=1), log=pf.quiet)
    path = tmp_path / "r" / "last" / "train_state.pt"
    state = torch.load(path, weights_only=True)
    del state["history"]  # as a run saved before the state kept its history
    torch.save(state, path)
    res = train(pipe.root, tmp_path / "r", None, pf.train_config(epochs=2), resume=True, log=pf.quiet)
    assert [r["epoch"] for r in res.history] == [1, 2]


def test_a_split_tokenised_with_another_vocabulary_is_refused(pipe, tmp_path):
    root = pf.copy_store(pipe, tmp_path)
    with pf.edited_json(root / "train" / "manifest.json") as m:
        m["vocab"]["sha256"] = "0" * 64
    vs = _vocab_size(root)
    with pytest.raises(DataError, match="split was encoded with another vocabulary than vocab.json"):
        train(root, tmp_path / "r", pf.model_config(vs), pf.train_config(epochs=1), log=pf.quiet)


def test_resume_refuses_a_best_that_another_run_left(pipe, tmp_path, monkeypatch):
    """A run started without resuming in a finished run's folder saves best/ before last/; stopped
    between the two, it left the old last/ beside its own best/, and --resume went on with the old
    run, claimed its best (epoch and rsum) and never replaced the best/ it did not hold."""
    import heiindex.train as train_module

    vs = _vocab_size(pipe.root)
    out = tmp_path / "r"
    train(pipe.root, out, pf.model_config(vs), pf.train_config(epochs=2, seed=5), log=pf.quiet)
    real_save = train_module.save_model

    def stopped_before_last(model, vocab, path, info, state=None):
        if path.name == "last":
            raise KeyboardInterrupt
        real_save(model, vocab, path, info, state=state)

    monkeypatch.setattr(train_module, "save_model", stopped_before_last)
    with pytest.warns(HeiindexWarning, match=rf"^{re.escape(str(out))} holds a run, which this one replaces"):
        with pytest.raises(KeyboardInterrupt):
            train(pipe.root, out, pf.model_config(vs, embed_size=8), pf.train_config(epochs=2), log=pf.quiet)
    monkeypatch.setattr(train_module, "save_model", real_save)
    best = load_model(out / "best").info
    with pytest.raises(DataError) as info:
        train(pipe.root, out, None, pf.train_config(epochs=3, seed=5), resume=True, log=pf.quiet)
    assert info.value.path == out / "best"
    assert info.value.problem.startswith(f"holds epoch 1 (dev rsum {best['dev']['rsum']:.2f}), not the run's best")
    assert "train without resuming to start again" in info.value.problem
    # a best/ that is gone, or that cannot be read, is named as such (both said "is missing")
    recorded = re.search(r"not (the run's best that last/ records \(epoch \d+, dev rsum [\d.]+\))", str(info.value))[1]
    config = json.loads((out / "best" / "config.json").read_text())
    for info_field, held in (
        (None, "holds no epoch or dev rsum"),
        ({"epoch": 8, "dev": None}, "holds epoch 8 but no dev rsum"),
        ({"epoch": "8", "dev": {"rsum": 12.5}}, "holds dev rsum 12.50 but no epoch"),
        ({"epoch": 8, "dev": {"rsum": "x"}}, "holds epoch 8 but no dev rsum"),
    ):  # a readable config that records no best: raw AttributeErrors and ValueErrors, or "holds no epoch"
        (out / "best" / "config.json").write_text(json.dumps({**config, "info": info_field}))
        with pytest.raises(DataError) as info:
            train(pipe.root, out, None, pf.train_config(epochs=3, seed=5), resume=True, log=pf.quiet)
        assert info.value.problem.startswith(f"{held}, not {recorded}"), info.value.problem
    (out / "best" / "config.json").write_text("{not json")
    with pytest.raises(DataError) as info:
        train(pipe.root, out, None, pf.train_config(epochs=3, seed=5), resume=True, log=pf.quiet)
    assert info.value.path == out / "best" and info.value.problem.startswith(f"cannot be read as {recorded}")
    assert "config.json" in info.value.problem
    shutil.rmtree(out / "best")
    with pytest.raises(DataError) as info:
        train(pipe.root, out, None, pf.train_config(epochs=3, seed=5), resume=True, log=pf.quiet)
    assert info.value.problem.startswith(f"is missing, so {recorded}")


def test_resume_refuses_another_vocabulary_and_says_the_data_changed(pipe, tmp_path):
    """A store of another vocabulary of the same size was taken (and replaced the run's
    vocab.json); other train or dev data went on without a word."""
    vs = _vocab_size(pipe.root)
    out = tmp_path / "r"
    train(pipe.root, out, pf.model_config(vs), pf.train_config(epochs=1, seed=5), log=pf.quiet)
    before = (out / "last" / "vocab.json").read_bytes()
    other = pf.copy_store(pipe, tmp_path)
    pf.swap_words(other / "vocab.json")
    for split in ("train", "dev", "test"):
        with pf.edited_json(other / split / "manifest.json") as m:
            m["vocab"]["sha256"] = Vocab.load(other / "vocab.json").checksum
    with pytest.raises(DataError, match=r"is another vocabulary than the run's .*resume it with the store") as info:
        train(other, out, None, pf.train_config(epochs=2, seed=5), resume=True, log=pf.quiet)
    assert info.value.path == other / "vocab.json"
    assert (out / "last" / "vocab.json").read_bytes() == before
    with pytest.warns(HeiindexWarning, match=r"^the dev split of .* differs from what the run in .* trained on"):
        train(pipe.root, out, None, pf.train_config(epochs=2, seed=5), val_split="test", resume=True, log=pf.quiet)


def test_resume_says_the_best_epoch_was_chosen_on_other_dev_images(pipe, tmp_path):
    """--val-images changed on resume compared rsums of other dev subsets without a word (rsum 580
    on 5 images replaced a best/ of 334 on 60). The run then records 5, and resuming with 5 says
    nothing."""
    out = tmp_path / "r"
    train(pipe.root, out, pf.model_config(_vocab_size(pipe.root)), pf.train_config(epochs=1), log=pf.quiet)
    with pytest.warns(HeiindexWarning, match=r"chose its best epoch on 24 dev images and now validates on 5 "):
        train(pipe.root, out, None, pf.train_config(epochs=2, val_images=5), resume=True, log=pf.quiet)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(
            pipe.root, out, None, pf.train_config(epochs=3, val_images=5), resume=True, log=pf.quiet
        )  # as recorded now


def test_train_names_a_store_that_is_not_one(tmp_path):
    """The library as the CLI: a missing root, then a folder without vocab.json, each by name."""
    with pytest.raises(DataError) as info:
        train(tmp_path / "nonexistent", tmp_path / "r", log=pf.quiet)
    assert info.value.path == tmp_path / "nonexistent" and info.value.problem.startswith("no such folder; a store root")
    (tmp_path / "precomp").mkdir()
    with pytest.raises(DataError) as info:
        train(tmp_path / "precomp", tmp_path / "r", log=pf.quiet)
    assert info.value.path == tmp_path / "precomp" / "vocab.json" and info.value.problem.startswith(
        "missing: not a store root"
    )
    (tmp_path / "precomp" / "vocab.json").mkdir()
    with pytest.raises(DataError, match=r"vocab\.json: not a file: not a store root"):
        train(tmp_path / "precomp", tmp_path / "r", log=pf.quiet)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DataError, match="a_file: is not a folder; a store root"):
        train(tmp_path / "a_file", tmp_path / "r", log=pf.quiet)
    assert not (tmp_path / "r").exists()


def test_cli_train_names_a_store_that_is_not_one(tmp_path):
    """It said '/nonexistent/vocab.json: vocab file not found'."""
    r = run("train", "--store", tmp_path / "nonexistent", "--out", tmp_path / "r")
    clean_error(r, f"{tmp_path / 'nonexistent'}: no such folder; a store root (the output folder of heiindex ingest)")
    (tmp_path / "precomp").mkdir()
    r = run("train", "--store", tmp_path / "precomp", "--out", tmp_path / "r")
    clean_error(r, f"{tmp_path / 'precomp' / 'vocab.json'}: missing: not a store root")
    assert not (tmp_path / "r").exists()


def test_validating_on_the_training_split_is_said(pipe, tmp_path):
    """train(val_split="train") chose its best epoch on its own training data without a word."""
    from heiindex.errors import HeiindexWarning

    with pytest.warns(
        HeiindexWarning, match=r"^validating on the split trained on, .*train: the best epoch is the one"
    ):
        train(pipe.root, tmp_path / "r", None, pf.train_config(epochs=1), val_split="./train/", log=pf.quiet)
