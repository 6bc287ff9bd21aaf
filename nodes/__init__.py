"""The pack's nodes, one module per family, registered through ComfyUI's V3 extension API."""

from comfy_api.latest import ComfyExtension, io

from .clear import CLEAR_NODES
from .compare import COMPARE_NODES
from .deepcache import DEEPCACHE_NODES
from .demo import DEMO_NODES
from .ditfastattn import DITFASTATTN_NODES
from .inspector import INSPECTOR_NODES
from .plans import PLAN_NODES


class FastAttnExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*INSPECTOR_NODES, *DITFASTATTN_NODES, *PLAN_NODES, *CLEAR_NODES, *DEEPCACHE_NODES, *COMPARE_NODES,
                *DEMO_NODES]


async def comfy_entrypoint() -> FastAttnExtension:
    return FastAttnExtension()
