"""--formats: the search space as formats, declared once for the CLI and the service body."""
import pytest

from common.formats import PaletteFormat
from search.config import ConfigError, SearchConfig
from search.submit_options import parse_search_options


def _config(options: dict) -> SearchConfig:
    """The config a submission resolves to (None: the model's default, left to SearchConfig here)."""
    return SearchConfig(**{k: v for k, v in options.items() if v is not None})


def test_default_search_space_is_apples_and_config_unchanged():
    options = parse_search_options({})
    assert options["nbits"] == (1, 2, 4, 6, 8)
    assert _config(options).to_dict()["nbits"] == [1, 2, 4, 6, 8]  # the stored form of every earlier search


@pytest.mark.parametrize("given", ["2,3g16,4,4g16,6,8", [2, "3g16", 4, "4g16", 6, 8]])
def test_formats_from_cli_text_or_json_list(given):
    config = _config(parse_search_options({"formats": given}))
    assert [str(f) for f in config.nbits] == ["2", "3g16", "4", "4g16", "6", "8"]
    assert config.to_dict()["nbits"] == [2, "3g16", 4, "4g16", 6, 8]
    assert SearchConfig.from_dict(config.to_dict()) == config
    assert config.anchors == (PaletteFormat(4),)


def test_nbits_and_formats_together_is_an_error():
    with pytest.raises(ConfigError, match="not both"):
        parse_search_options({"formats": "4", "nbits": "4"})


def test_service_body_accepts_formats():
    from search.service.requests import SubmitRequest

    body = SubmitRequest(model="tiny-sdxl", formats=[4, "4g16"])
    assert [str(f) for f in _config(body.options()).nbits] == ["4", "4g16"]
