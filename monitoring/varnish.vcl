vcl 4.1;
# Varnish in front of a tiercache-backed application, purged by `tiercache purge --backend varnish`.
#
# - The application tags each response with an `xkey` header (tiercache_client::edge::xkey): the
#   edge keys of the tags of the cache entries the page was built from, plus the namespace key.
# - `tiercache purge` sends `PURGE /` with `xkey-purge: key1 key2 ...` for each batch of invalidated
#   tags, and `xkey-purge-all: 1` for a full purge when it runs without --namespace-key.
# - Only the addresses in the `purgers` ACL may purge.
#
# Needs varnish-modules (vmod xkey); Debian: apt-get install varnish varnish-modules.

import xkey;
import std;

# The application. The tests replace this block with their origin's address.
backend default {
    .host = "127.0.0.1";
    .port = "8080";
}

acl purgers {
    "127.0.0.1";
    "::1";
}

sub vcl_recv {
    if (req.method == "PURGE") {
        if (client.ip !~ purgers) {
            return (synth(403, "Forbidden"));
        }
        if (req.http.xkey-purge) {
            set req.http.n-gone = xkey.purge(req.http.xkey-purge);
            return (synth(200, "Purged " + req.http.n-gone + " objects"));
        }
        if (req.http.xkey-purge-all == "1") {
            std.ban("obj.status != 0");
            return (synth(200, "Banned everything"));
        }
        return (synth(400, "PURGE needs an xkey-purge or xkey-purge-all header"));
    }
}

sub vcl_deliver {
    # Keys are for the purger, not for browsers.
    unset resp.http.xkey;
    if (obj.hits > 0) {
        set resp.http.X-Cache = "HIT";
    } else {
        set resp.http.X-Cache = "MISS";
    }
}
