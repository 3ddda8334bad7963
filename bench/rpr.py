"""The baseline: Twisted's plain ReverseProxyResource, as the bench's "twisted-rpr".

    python bench/rpr.py LISTEN_PORT UPSTREAM_PORT

No tuning: the default reactor, HTTP/1.0 and a new upstream connection per request.
It sets Authorization like the other proxies, and logs nothing per request.  Its
open-files limit comes from bench/run.py, which raises its own before starting it.
"""
import sys

from twisted.internet import reactor
from twisted.web import proxy, server


class Site(server.Site):
    noisy = False

    def getResourceFor(self, request):  # every child resource is a plain ReverseProxyResource
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer sk-bench"])
        return super().getResourceFor(request)

    def log(self, request):  # no access log
        pass


proxy.ProxyClientFactory.noisy = False  # no "Starting/Stopping factory" per upstream connection
listen, upstream = int(sys.argv[1]), int(sys.argv[2])
reactor.listenTCP(listen, Site(proxy.ReverseProxyResource("127.0.0.1", upstream, b"")),
                  interface="127.0.0.1")
reactor.run()
