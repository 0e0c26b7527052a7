"""The runtime type checker that conftest installs over the project's packages.

PEP 484's numeric tower: an ``int`` is a valid ``float`` (``temperature=0`` is fine).
"""

from beartype import BeartypeConf, beartype

typechecker = beartype(conf=BeartypeConf(is_pep484_tower=True))
