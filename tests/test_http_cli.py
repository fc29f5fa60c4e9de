"""Options of 'index build', 'index add', 'query' and 'serve' are checked when parsed (exit 2
naming the option), 'serve' loads before it announces, 'query' leaves the query image out."""
from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("faiss")

from test_retrieval import small_run  # noqa: E402

from spml_deploy.cli import main  # noqa: E402
from spml_deploy.serving import ingest as IN  # noqa: E402
from spml_deploy.data.synth import synthesize  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    run = small_run(root / "run")
    synthesize(root / "data", n_train=4, n_val=1, size=64, seed=2)
    src = root / "photos"
    src.mkdir()
    for p in sorted((root / "data" / "images").glob("train_*.png")):
        shutil.copy(p, src / p.name)
    IN.build_index(run, src, root / "idx", progress=False)
    return root, run, root / "idx", src


def _cli(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.mark.parametrize("argv,option", [
    (["serve", "{run}", "--port", "99999"], "--port"),
    (["serve", "{run}", "--port", "0"], "--port"),
    (["serve", "{run}", "--max-upload-mb", "-1"], "--max-upload-mb"),
    (["serve", "{run}", "--max-upload-mb", "nan"], "--max-upload-mb"),
    (["serve", "{run}", "--max-pixels", "-5"], "--max-pixels"),
    (["serve", "{run}", "--max-k", "0"], "--max-k"),
    (["serve", "{run}", "--max-concurrent", "0"], "--max-concurrent"),
    (["serve", "{run}", "--max-queue", "-1"], "--max-queue"),
    (["serve", "{run}", "--threads", "0"], "--threads"),
    (["serve", "{run}", "--backend", "tpu"], "--backend"),
    (["query", "{idx}", "{img}", "--point", "1.5,2.5"], "--point"),
    (["query", "{idx}", "{img}", "--point", "1,2,3"], "--point"),
    (["query", "{idx}", "{img}", "--box", "0,0,10.5,4"], "--box"),
    (["query", "{idx}", "{img}", "--point", "1,1", "-k", "0"], "-k"),
    (["query", "{idx}", "{img}", "--point", "1,1", "--show", "{root}"], "--show"),
    (["query", "{idx}", "{img}", "--point", "1,1", "--show", "{img}/x.png"], "--show"),
    (["query", "{idx}", "{root}", "--point", "1,1"], "IMAGE"),
    (["query", "{idx}", "{img}", "--mask", "{root}"], "--mask"),
    (["index", "build", "{run}", "{src}", "--out", "{root}/new", "--batch", "0"], "--batch"),
    (["index", "build", "{run}", "{src}", "--out", "{root}/new", "--nlist", "0"], "--nlist"),
    (["index", "build", "{run}", "{src}", "--out", "{root}/new", "--nprobe", "-1"], "--nprobe"),
    (["index", "build", "{run}", "{src}", "--out", "{root}/new", "--ef-search", "0"],
     "--ef-search"),
    (["index", "build", "{run}", "{src}", "--out", "{root}/new", "--index-type", "lsh"],
     "--index-type"),
    (["index", "add", "{idx}", "{src}", "--batch", "0"], "--batch"),
])
def test_bad_options_exit_2_naming_the_option(built, capsys, argv, option):
    root, run, idx, src = built
    img = src / "train_00000.png"
    argv = [a.format(run=run, idx=idx, img=img, root=root, src=src) for a in argv]
    code, out, err = _cli(capsys, *argv)
    assert code == 2, (out, err)
    assert option in err and "Traceback" not in err, err
    assert "serving" not in err and not (root / "new").exists()


def test_serve_checks_the_model_and_index_before_announcing(built, capsys, tmp_path):
    root, run, idx, src = built
    code, _, err = _cli(capsys, "serve", "nonexist")
    assert code == 2 and "'nonexist' does not exist" in err and "serving" not in err
    code, _, err = _cli(capsys, "serve", run, "--index", tmp_path / "missing-index")
    assert code == 2 and "missing-index" in err and "does not exist" in err
    code, _, err = _cli(capsys, "serve", run, "--index", tmp_path)       # a folder, no index
    assert code == 2 and "no segment store here" in err and "serving" not in err


def test_query_cli_leaves_the_query_image_out(built, capsys):
    root, run, idx, src = built
    img = src / "train_00002.png"
    code, out, err = _cli(capsys, "query", idx, img, "--point", "20,20", "-k", "50", "--json")
    assert code == 0, err
    body = json.loads(out)
    assert body["query"]["in_index"] is True and body["query"]["excluded_images"] == 1
    assert body["hits"] and all(h["image"] != "train_00002.png" for h in body["hits"])
    assert all(h["path"] == str((src / h["image"]).resolve()) for h in body["hits"])
    code, out, _ = _cli(capsys, "query", idx, img, "--point", "20,20", "-k", "1", "--json",
                        "--include-self")
    top = json.loads(out)["hits"][0]
    assert top["image"] == "train_00002.png" and top["score"] == pytest.approx(1, abs=1e-5)
    code, out, _ = _cli(capsys, "query", idx, img, "--point", "20,20", "-k", "2")
    assert code == 0 and "its own segments are left out" in out
    assert str(src.resolve()) in out                       # full local paths for a local user
