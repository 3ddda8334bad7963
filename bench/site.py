"""A floor: Twisted's hello-world Site, as the bench's "twisted-site".

    python bench/site.py LISTEN_PORT

One leaf resource answering every request with 12 bytes: the cost of Twisted's HTTP
server side alone, with the default reactor and no access log (as bench/rpr.py).
"""
import sys

from twisted.internet import reactor
from twisted.web import resource, server


class Hello(resource.Resource):
    isLeaf = True

    def render(self, request):
        return b"Hello world!"


class Site(server.Site):
    noisy = False

    def log(self, request):  # no access log
        pass


reactor.listenTCP(int(sys.argv[1]), Site(Hello()), interface="127.0.0.1")
reactor.run()
