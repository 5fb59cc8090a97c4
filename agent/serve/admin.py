"""The admin API, served on the Unix socket only."""

from aiohttp import web

from agent.runtime import Agent


def routes(agent: Agent) -> list[web.RouteDef]:
    return []
