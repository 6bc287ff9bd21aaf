"""The pack's nodes, one module per family, registered through ComfyUI's V3 extension API."""

from comfy_api.latest import ComfyExtension, io

# (inspector pending)

NODE_PREFIX = "FastAttn"


class FastAttnExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []


async def comfy_entrypoint() -> FastAttnExtension:
    return FastAttnExtension()
