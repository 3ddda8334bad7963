"""``twistd openaigw``: command-line options and the service they make."""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from openaigw import config
from openaigw.admin import open_catalog
from openaigw.descriptors import fit_connections

EX_CONFIG = 78  # sysexits.h: configuration error


class Options(usage.Options):
    """twistd openaigw [-c FILE] [--check]"""

    synopsis = "[-c FILE] [--check]"
    longdesc = (
        "An OpenAI API gateway: routes configured URIs to upstreams over verified TLS, "
        "attaches the real API key and streams answers through as they arrive."
    )
    optParameters = [
        ["config", "c", "/etc/openaigw/gw.ini", "The configuration file (gw.ini)."],
    ]
    optFlags = [
        ["check", None, "Validate the configuration, then exit: 0 if valid, 78 with the errors."],
    ]

    def postOptions(self) -> None:
        # Errors exit here with EX_CONFIG (twistd 22.4 would exit 0 on UsageError);
        # the systemd unit does not restart on it (RestartPreventExitStatus=78).
        try:
            self.config = config.load(self["config"])
            # The Admin API's state is read here too: a corrupt one is an error like a bad gw.ini.
            self.catalog = open_catalog(self.config) if self.config.gateway.admin else None
            fit_connections(self.config)  # the file limit is the process's: checked here
        except config.ConfigError as e:
            sys.stderr.write(f"openaigw: {e}\n")
            sys.stderr.flush()
            raise SystemExit(EX_CONFIG)
        if self["check"]:
            sys.stdout.write(f"openaigw: {self['config']}: configuration OK\n")
            sys.stdout.flush()
            raise SystemExit(0)


def makeService(options: Options) -> Any:
    from twisted.internet import reactor

    if options.config.gateway.worker_count() > 1:
        from openaigw.supervisor import Supervisor

        return Supervisor(options.config, config.read(options["config"]), reactor)

    from openaigw import writethrough
    from openaigw.service import GatewayService

    writethrough.install()  # the gateway process's TCP writes go out at once
    return GatewayService(options.config, reactor, options.catalog)
