"""The sealgate addon for a stock mitmdump (needs sealgate installed in its environment):

    mitmdump -s addons/script.py --set sealgate_data_dir=data --set confdir=certs

`sealgate run` is leaner (MITMPROXY-NOTES.md): it loads only the addons the request path needs.
"""

from addons.addon import Sealgate

addons = [Sealgate()]
