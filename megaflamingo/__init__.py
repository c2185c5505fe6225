"""megaflamingo: OpenFlamingo-exact Flamingo models, trained 3D-parallel on DeepSpeed.

Public surface (DESIGN.md section 9): `megaflamingo.config.load_config`, `megaflamingo.resolve`
(`resolve_config`, `check_layout`), `megaflamingo.build_model` (resolve + build + import an
OpenFlamingo checkpoint: `megaflamingo.builder`), `megaflamingo.Flamingo`, `megaflamingo.convert.openflamingo`.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import megaflamingo.config` (CLI argument errors) does not pay for torch imports.
    if name == "build_model":
        from megaflamingo.builder import build_model

        return build_model
    if name == "Flamingo":
        from megaflamingo.models.flamingo import Flamingo

        return Flamingo
    if name == "from_openflamingo":  # a released OpenFlamingo model in one call (#11)
        from megaflamingo.convert.openflamingo import from_openflamingo

        return from_openflamingo
    raise AttributeError(f"module 'megaflamingo' has no attribute '{name}'")
