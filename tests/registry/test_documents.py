"""Registry documents that are JSON but not a JSON object fail with a clear RegistryError."""

import pytest

from stargz_overlay.errors import RegistryError

from ..registryfixture import push_image
from .conftest import make_client


def test_a_config_that_is_not_an_object_is_a_clear_error(registry):
    ref = f"{registry.host}/oddconfig:1"
    with make_client(registry.host) as c:
        push_image(c, ref, [b"not a real layer"], config=["a", "list"])
        with pytest.raises(RegistryError, match=r"oddconfig:1: image config is not a JSON object"):
            c.resolve(ref)
