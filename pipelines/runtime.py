"""Everything a step needs, built once per process from the settings: the runtime."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import cached_property

import httpx

from genline.config.catalog import Catalog, load_catalog
from genline.config.errors import StorageError
from genline.config.logging import register_secret
from genline.config.settings import Settings
from genline.pipelines.audit import DatabaseAuditSink, current_hold
from genline.pipelines.cache import CopyCache, copy_cache_for
from genline.pipelines.dispatch import Dispatcher, MemoryDispatcher
from genline.pipelines.leases import StepLeases
from genline.pipelines.spend import SpendGuard
from genline.provider.client import ProviderClient
from genline.provider.gateway import CallRecord, Gateway, RetryPolicy, Stage
from genline.provider.safe_http import AddressPolicy, DownloadLimit, SafeClient
from genline.provider.shared_state import SharedState, shared_state_for
from genline.provider.stages import AccountGuard, CircuitBreaker, RequestBudget
from genline.storage.db import Database
from genline.storage.factory import open_store
from genline.storage.objects import ObjectStore


@dataclass
class Runtime:
    settings: Settings
    catalog: Catalog
    db: Database
    store: ObjectStore
    dispatcher: Dispatcher = field(default_factory=MemoryDispatcher)

    @classmethod
    def from_settings(cls, settings: Settings, dispatcher: Dispatcher | None = None) -> Runtime:
        if settings.provider_api_key is not None:
            register_secret(settings.provider_api_key.reveal())
        return cls(
            settings=settings,
            catalog=load_catalog(settings.catalog_file),
            db=Database(settings.database_url),
            store=open_store(settings.storage_url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region),
            dispatcher=dispatcher or MemoryDispatcher(),
        )

    @property
    def retry_policy(self) -> RetryPolicy:
        s = self.settings
        return RetryPolicy(
            max_attempts=s.provider_max_attempts, base_s=s.provider_backoff_s, cap_s=s.provider_backoff_cap_s
        )

    @cached_property
    def shared(self) -> SharedState:
        """Redis on the production footprint; else the database, through an engine of its own, so
        its short transactions never wait for a connection a step holds (or the other way)."""
        s = self.settings
        db = None if s.broker_url.startswith(("redis://", "rediss://")) else Database(s.database_url, pool_size=2)
        return shared_state_for(s.broker_url, embedded=s.embedded_broker, db=db)

    @property
    def stages(self) -> list[Stage]:
        """In the gateway's order: budget → pause → rate limit → breaker."""
        s = self.settings
        return [
            SpendGuard(self.db, self.catalog, held=self._held_records),
            AccountGuard(self.shared, pause_s=s.pause_s),
            self.budget,
            CircuitBreaker(self.shared, threshold=s.breaker_threshold, cooldown_s=s.breaker_cooldown_s),
        ]

    @cached_property
    def budget(self) -> RequestBudget:
        """The provider key's request budget, shared by every process (provider/stages.py): the
        gateway's calls, the poller's rounds and result downloads all draw from it."""
        return RequestBudget.for_limit(self.shared, self.settings.provider_rate_per_s)

    def _held_records(self) -> list[CallRecord]:
        """The records the running step holds, not yet in the database (its spend so far)."""
        return current_hold(self.gateway.audit).records

    @cached_property
    def leases(self) -> StepLeases:
        """The leases of the steps this process runs, renewed while they run (pipelines/leases.py)."""
        return StepLeases(self.db, self.settings.lease_s)

    @cached_property
    def copy_cache(self) -> CopyCache | None:
        """The copy step's response cache (pipelines/cache.py), where the shared state is: Redis on
        the production footprint, else the database; None when GENLINE_COPY_CACHE_TTL_S is 0."""
        return copy_cache_for(self.settings, self.shared, self.db)

    @cached_property
    def gateway(self) -> Gateway:
        return Gateway(
            self.catalog,
            DatabaseAuditSink(self.db),
            client=ProviderClient(self.settings),
            stages=self.stages,
            retry=self.retry_policy,
        )

    @cached_property
    def url_policy(self) -> AddressPolicy:
        """The private hosts genline may reach all the same (GENLINE_ALLOW_PRIVATE_HOSTS)."""
        return AddressPolicy.from_entries(self.settings.allow_private_hosts)

    @cached_property
    def downloads(self) -> httpx.Client:
        """For provider result URLs and callbacks: no Authorization header ever goes to a download
        host, and only public addresses (or allowed ones) are reached, on every redirect hop, with
        a size limit and an overall deadline per download of each kind (provider/safe_http.py)."""
        s = self.settings
        mib = 1024 * 1024
        return SafeClient(
            self.url_policy,
            timeout=httpx.Timeout(s.http_timeout_s, connect=s.http_connect_timeout_s),
            limits={
                "image": DownloadLimit(int(s.max_image_download_mb * mib), s.image_download_deadline_s),
                "video": DownloadLimit(int(s.max_video_download_mb * mib), s.video_download_deadline_s),
            },
        )

    def warm(self) -> None:
        """Build now what a step would otherwise build on its first use: the provider and download
        clients (their TLS contexts), the shared-state client, and the object store's signer and
        endpoint (by signing a URL, which is done locally). Nothing goes over the network."""
        _ = self.gateway, self.downloads, self.shared
        with contextlib.suppress(StorageError):  # no credentials yet, say: the first real call reports it
            self.store.presigned_url("genline-warm-up", 60)

    def close(self) -> None:
        if "downloads" in self.__dict__:
            self.downloads.close()
        if "gateway" in self.__dict__:
            self.gateway.close()
        if "shared" in self.__dict__:
            self.shared.close()
        if (copy_cache := self.__dict__.get("copy_cache")) is not None:
            copy_cache.close()
        if "leases" in self.__dict__:
            self.leases.close()
        self.dispatcher.close()
        self.db.dispose()
