"""``nerfstudio.dataparser_configs`` entry point (``llff-data``).

nerfstudio imports this while building ``nerfstudio.configs.dataparser_configs``, so it must import only
dataparser classes: importing any other nerfstudio config module here makes ``ns-train --help`` fail with a
circular ImportError.
"""

from gen_lifting.llff_dataparser import LLFFDataParserConfig
from nerfstudio.plugins.registry_dataparser import DataParserSpecification

llff_dataparser = DataParserSpecification(
    config=LLFFDataParserConfig(),
    description="LLFF forward-facing scenes (poses_bounds.npy + images_N/), e.g. --data fern",
)
