"""One spelling per option across commands: the new spellings reach the library, the old ones still work with a
note that names the new one, and contradicting both is refused. The library calls are replaced by recorders, so
these tests check the command line only."""
import pytest

from nnunet_diffaug import cli
from nnunet_diffaug.errors import DiffAugError

SYNTH = ["-d", "990", "-f", "0", "-n", "2"]


@pytest.fixture
def synthesize_calls(monkeypatch):
    import nnunet_diffaug.judge_filter as judge_filter
    import nnunet_diffaug.synthesis.synthesize as synthesize
    calls = []
    monkeypatch.setattr(synthesize, "synthesize", lambda *a, **kw: calls.append(("plain", a, kw)) or "out")
    monkeypatch.setattr(judge_filter, "judge_folder", lambda *a: "judge_model")
    monkeypatch.setattr(judge_filter, "synthesize_filtered", lambda *a, **kw: calls.append(("judged", a, kw)) or "out")
    monkeypatch.setattr("nnunet_diffaug.paths.resolve_dataset_name", lambda d: "Dataset990_X")
    return calls


def test_synthesize_output_dataset_and_its_older_spelling(synthesize_calls, capsys):
    cli.synthesize_entry.__wrapped__(SYNTH + ["--output-dataset", "905"])
    assert synthesize_calls[-1][2]["output_id"] == 905 and "deprecated" not in capsys.readouterr().err
    cli.synthesize_entry.__wrapped__(SYNTH + ["-o", "906"])
    assert synthesize_calls[-1][2]["output_id"] == 906
    assert "NOTE: -o is deprecated: use --output-dataset" in capsys.readouterr().err
    with pytest.raises(DiffAugError, match="-o 906 and --output-dataset 905 disagree"):
        cli.synthesize_entry.__wrapped__(SYNTH + ["-o", "906", "--output-dataset", "905"])
    cli.synthesize_entry.__wrapped__(SYNTH + ["--generator", "randomised", "-plans", "nnUNetPlansSmall"])
    assert synthesize_calls[-1][2]["plans_identifier"] == "nnUNetPlansSmall"
    assert "NOTE: -plans is deprecated: use -p" in capsys.readouterr().err


def test_judge_mirrors_at_test_time_unless_disable_tta(synthesize_calls, capsys):
    cli.synthesize_entry.__wrapped__(SYNTH + ["--judge", "T__P__3d_fullres"])
    assert synthesize_calls[-1][1][5].use_mirroring is True      # nnU-Net's default, as nnUNetv2_predict
    cli.synthesize_entry.__wrapped__(SYNTH + ["--judge", "T__P__3d_fullres", "--disable_tta"])
    assert synthesize_calls[-1][1][5].use_mirroring is False
    cli.synthesize_entry.__wrapped__(SYNTH + ["--judge", "T__P__3d_fullres", "--judge-tta"])
    assert synthesize_calls[-1][1][5].use_mirroring is True
    assert "--judge-tta is deprecated" in capsys.readouterr().err
    with pytest.raises(DiffAugError, match="contradict"):
        cli.synthesize_entry.__wrapped__(SYNTH + ["--judge", "T__P__3d_fullres", "--judge-tta", "--disable_tta"])
    with pytest.raises(DiffAugError, match="need --judge MODEL"):
        cli.synthesize_entry.__wrapped__(SYNTH + ["--disable_tta"])


def test_benchmark_ratios_and_synthetic_only_say_which_arms_they_mean(monkeypatch, capsys):
    import nnunet_diffaug.benchmark as benchmark
    runs = []
    monkeypatch.setattr("nnunet_diffaug.paths.resolve_dataset_name", lambda d: "Dataset990_X")
    monkeypatch.setattr(benchmark, "run_benchmark", lambda s, out, verbose: runs.append(s) or {})
    monkeypatch.setattr(benchmark, "format_table", lambda results: "")
    cli.benchmark_entry.__wrapped__(["-d", "990", "-o", "ws", "--ratios", "0.1", "0.33", "--synthetic-only"])
    assert runs[-1].arms == ("stock", "diffaug_r10", "diffaug_r33", "synthetic_only")
    assert ("NOTE: --ratios 0.1 0.33 --synthetic-only is deprecated: it means --arms stock diffaug_r10 diffaug_r33 "
            "synthetic_only") in capsys.readouterr().err
    cli.benchmark_entry.__wrapped__(["-d", "990", "-o", "ws", "--arms", "diffaug_r50"])
    assert runs[-1].arms == ("diffaug_r50",) and "deprecated" not in capsys.readouterr().err


@pytest.mark.parametrize("command, old", [(cli.synthesize_entry, ["-o", "--judge-tta", "-plans"]),
                                          (cli.benchmark_entry, ["--ratios", "--synthetic-only"]),
                                          (cli.train_synthesizer_entry, ["-plans"])])
def test_deprecated_spellings_are_hidden_from_help(command, old, capsys):
    with pytest.raises(SystemExit):
        command.__wrapped__(["-h"])
    shown = capsys.readouterr().out.split()
    assert not [flag for flag in old if flag in shown or f"{flag}," in shown]


@pytest.mark.parametrize("command, argv, message", [
    (cli.synthesize_entry, SYNTH + ["--label-guidance", "0.5"], "--label-guidance: must lie in [1"),
    (cli.train_synthesizer_entry, ["-d", "990", "-f", "0", "--unlabeled", "pool", "--unlabeled-only"],
     "an --unlabeled-only synthesizer belongs to no fold"),
])
def test_contradicting_or_weakening_flags_are_refused_while_parsing(command, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        command.__wrapped__(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
