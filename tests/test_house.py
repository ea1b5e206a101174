"""The house's map stays whole: every module of the project has its place in a layer of .importlinter
(the contracts themselves run in `make lint`), so a new file cannot slip past the import rules."""
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _layer_entries() -> set[str]:
    ini = configparser.ConfigParser()
    ini.read(ROOT / ".importlinter")
    text = ini["importlinter:contract:layers"]["layers"]
    return {name.strip() for line in text.splitlines() for name in line.replace(":", "|").split("|") if name.strip()}


def _modules() -> set[str]:
    """Modules as the contract names them (relative to the cltrain container); a package's own modules
    are covered by the package's entry."""
    out = {p.stem for p in (ROOT / "cltrain").glob("*.py") if p.stem != "__init__"}
    out |= {f"train.{p.stem}" for p in (ROOT / "train").glob("*.py") if p.stem != "__init__"}
    out |= {f"train.{p.name}" for p in (ROOT / "train").iterdir() if (p / "__init__.py").is_file()}
    return out | {"kernels"}


def test_every_module_has_a_layer():
    entries = _layer_entries()
    missing = sorted(_modules() - entries)
    assert not missing, f"modules with no layer in .importlinter: {missing}"
    stale = sorted(entries - _modules())
    assert not stale, f".importlinter names modules that do not exist: {stale}"
