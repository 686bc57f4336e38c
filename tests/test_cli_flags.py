"""One message, two namings: the library names a setting by its Python parameter (`nlist` 12,
``heiindex.errors``), the command line by its flag (--nlist 12), and only where the library
marks it as a setting: an ordinary word that is also a setting's name stays as it is."""

from __future__ import annotations

import pickle
import warnings

import click
from click.testing import CliRunner

from cli.main import handle_errors
from heiindex.errors import DataError, HeiindexError, HeiindexWarning, UnusedSettingWarning
from heiindex.settings import SettingError


def _say(problem: Exception | Warning):
    """A command with flags for a few settings (``--model`` setting ``model_dir``) that raises or
    warns ``problem``: what the user reads."""

    @click.command()
    @click.option("--candidates", type=int)
    @click.option("--k", type=int)
    @click.option("--vocab")
    @click.option("--codes")
    @click.option("--resume", is_flag=True)
    @click.option("--model", "model_dir")
    @click.option("--protocol")
    @handle_errors
    def command(**_):
        if isinstance(problem, Warning):
            warnings.warn(problem, stacklevel=1)
        else:
            raise problem

    return CliRunner().invoke(command, [])


def test_a_setting_is_flagged_where_it_is_marked_and_nowhere_else():
    """The settings an error names were named by their flags by a whole-word replace, which also
    flagged ordinary words: "the 12 --candidates", "--vocab.json", "Milvus --codes", "--resume=True"."""
    r = _say(
        HeiindexError(
            "k 13 is larger than the 12 candidates the shards return together; `candidates` 4 from each: "
            "vocab.json's words, Milvus codes (resume=True); give `vocab`",
            settings=("k", "candidates", "vocab", "codes", "resume"),
        )
    )
    assert r.exit_code == 2
    assert r.output == (
        "Error: --k 13 is larger than the 12 candidates the shards return together; --candidates 4 from each: "
        "vocab.json's words, Milvus codes (resume=True); give --vocab\n"
    )
    # a setting out of range as before: its name first, the others where marked
    r = _say(SettingError("k", "k 13 exceeds the 12 candidates of vocab.json", also=("candidates", "vocab")))
    assert r.output == "Error: --k 13 exceeds the 12 candidates of vocab.json\n"
    # the first word only where it is the name, followed by a space
    r = _say(HeiindexError("vocab.json is missing; candidates: give `vocab`", settings=("vocab", "candidates")))
    assert r.output == "Error: vocab.json is missing; candidates: give --vocab\n"


def test_the_librarys_names_for_a_commands_parameters_are_flagged_where_the_command_has_them():
    """``matcher`` is set by --model (the command's ``model_dir``), ``protocols`` by --protocol; a
    setting the command has no flag for (``hasher`` here) keeps the library's name."""
    r = _say(
        DataError(
            "/x/manifest.json",
            "give the matcher folder as `matcher` and the hash module folder as `hasher`; `protocols` full",
            settings=("matcher", "hasher", "protocols"),
        )
    )
    assert r.output == (
        "Error: /x/manifest.json: give the matcher folder as --model and the hash module folder as `hasher`; "
        "--protocol full\n"
    )


def test_warnings_name_their_settings_as_errors_do():
    r = _say(UnusedSettingWarning("`k` 3 and `vocab` x not used: the candidates", settings=("k", "vocab")))
    assert r.exit_code == 0 and r.output == "Warning: --k 3 and --vocab x not used: the candidates\n"
    r = _say(HeiindexWarning("the 12 candidates of vocab.json; `candidates` 3 avoids it", settings=("candidates",)))
    assert r.output == "Warning: the 12 candidates of vocab.json; --candidates 3 avoids it\n"


def test_errors_keep_their_settings_when_pickled():
    """A Ray actor's refusal reaches the driver pickled: its settings too, or the CLI could not
    name them by their flags."""
    for err in (
        HeiindexError("k 3 is larger than `candidates` 2", settings=("k", "candidates")),
        DataError("/x/vocab.json", "give `vocab`", settings=("vocab",)),
        SettingError("nprobe", "nprobe 3 exceeds `nlist` 2", also=("nlist",)),
    ):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and back.settings == err.settings
