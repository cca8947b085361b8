"""A LiveKit server and a delivery service wired together, for the pytest plugin and the
scenario runner (kept apart from the plugin so the runner and the demo need no pytest)."""

from __future__ import annotations

from dataclasses import dataclass

from mls_provider.authority import IdentityAuthority
from mls_provider.testing.ds_process import DeliveryServiceProcess
from mls_provider.testing.livekit_server import LiveKitServer


@dataclass
class Stack:
    livekit: LiveKitServer
    ds: DeliveryServiceProcess

    def stop(self) -> None:
        self.ds.stop()
        self.livekit.stop()


def start_stack(workdir: str, *, ds_args: tuple[str, ...] = (), authority: bool = True) -> Stack:
    """A LiveKit server and a delivery service wired together (webhooks, presence checks),
    in authority mode (a fresh identity authority playing the app's) unless ``authority``
    is False (open mode: a LiveKit token is enough to become a member)."""
    livekit = LiveKitServer(workdir=f"{workdir}/livekit")
    # the DS picks its ports now, so LiveKit can be told where to send webhooks
    ds = DeliveryServiceProcess(
        livekit.api_key,
        livekit.api_secret,
        workdir=f"{workdir}/ds",
        extra_args=ds_args,
        authority=IdentityAuthority.generate() if authority else None,
    )
    livekit.webhook_urls = [ds.webhook_url]
    livekit.start()
    ds.livekit_url = livekit.http_url  # lets the DS verify members' disconnect reports
    try:
        ds.start()
    except BaseException:
        livekit.stop()
        raise
    return Stack(livekit, ds)
