"""The runtime: messages, actors, graph, scheduler and policies (async, on anyio)."""
