"""The sealgate addon for a stock mitmdump (sealgate installed in its environment):

    mitmdump -s scripts/mitmdump_addon.py --set sealgate_data_dir=data --set confdir=certs

It lives outside the package: mitmproxy puts a script's folder on sys.path, which must not
make sealgate's modules importable as top-level modules. `sealgate run` is leaner
(MITMPROXY-NOTES.md): it loads only the addons the request path needs.
"""

from sealgate.addon import Sealgate
from sealgate.connections import Undecided

sealgate = Sealgate()
addons = [sealgate, Undecided(sealgate.connections)]  # (after mitmdump's own NextLayer)
