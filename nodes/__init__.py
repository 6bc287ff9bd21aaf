"""The pack's nodes, one module per family, registered through ComfyUI's V3 extension API."""

from comfy_api.latest import ComfyExtension, io

from .inspector import AttentionInspector


class FastAttnExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [AttentionInspector]


async def comfy_entrypoint() -> FastAttnExtension:
    return FastAttnExtension()
