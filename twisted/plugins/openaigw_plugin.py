"""twistd plugin: ``twistd openaigw -c gw.ini`` (import-light on purpose)."""

from twisted.application.service import ServiceMaker

openaigw = ServiceMaker(
    "openaigw-gateway", "openaigw.tap", "An OpenAI API gateway (reverse proxy).", "openaigw"
)
