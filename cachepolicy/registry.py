"""Plugin discovery through the ``cachepolicy`` entry-point group.

Built-in policies and adapters are registered through the same group (see ``pyproject.toml``), so the
built-ins exercise discovery. A plugin that fails to import is recorded with its error and never stops the
others from loading.
"""

from __future__ import annotations

import importlib.metadata as metadata
import logging
import traceback
from collections.abc import Iterable
from typing import Any

import attrs
import pluggy

from cachepolicy.errors import UnknownNameError
from cachepolicy.hookspecs import ENTRY_POINT_GROUP, PROJECT_NAME, DiscoverySpecs
from cachepolicy.models import ModelEntry
from cachepolicy.policy import Policy, hook_names

logger = logging.getLogger(__name__)


@attrs.frozen
class PluginRecord:
    """One line of ``cachepolicy plugins``: something a plugin provides, or a plugin that failed."""

    name: str
    kind: str  # "policy", "model", "metric", or "plugin" (a plugin that failed or provides nothing)
    entry_point: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...] = ()
    summary: str = ""
    adapter: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["hooks"] = list(self.hooks)
        if data["adapter"] is None:
            del data["adapter"]
        return data


@attrs.define
class Registry:
    """Everything discovered: policy classes and model entries by name, and one record per item."""

    policies: dict[str, type[Policy]] = attrs.field(factory=dict)
    models: dict[str, ModelEntry] = attrs.field(factory=dict)
    metrics: dict[str, type] = attrs.field(factory=dict)
    records: list[PluginRecord] = attrs.field(factory=list)

    def policy(self, name: str) -> type[Policy]:
        try:
            return self.policies[name]
        except KeyError:
            raise UnknownNameError("policy", name, self.policies) from None

    def metric(self, name: str) -> type:
        try:
            return self.metrics[name]
        except KeyError:
            raise UnknownNameError("metric", name, self.metrics) from None

    def model(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            raise UnknownNameError("model", name, self.models) from None

    @property
    def errors(self) -> list[PluginRecord]:
        return [r for r in self.records if r.error]


def _dist_info(ep: metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def _iter_entry_points(group: str) -> list[metadata.EntryPoint]:
    seen: set[tuple[str, str]] = set()
    unique = []
    for ep in metadata.entry_points(group=group):
        key = (ep.name, ep.value)
        if key not in seen:
            seen.add(key)
            unique.append(ep)
    # built-ins (our own distribution) first, so a third party cannot shadow them silently
    return sorted(unique, key=lambda ep: (_dist_info(ep)[0] != PROJECT_NAME, ep.name))


def discover(group: str = ENTRY_POINT_GROUP, extra_plugins: Iterable[Any] = ()) -> Registry:
    """Load every entry point of ``group`` (plus ``extra_plugins`` objects) and collect what they provide."""
    registry = Registry()
    sources: list[tuple[str, str, str | None, str | None, Any]] = []
    for ep in _iter_entry_points(group):
        dist, version = _dist_info(ep)
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - any failure of a third-party import is reported
            message = f"{type(exc).__name__}: {exc}"
            logger.warning("plugin %r (%s) failed to load: %s", ep.name, ep.value, message)
            logger.debug("%s", traceback.format_exc())
            registry.records.append(PluginRecord(ep.name, "plugin", ep.value, dist, version, error=message))
            continue
        sources.append((ep.name, ep.value, dist, version, plugin))
    for index, plugin in enumerate(extra_plugins):
        name = getattr(plugin, "__name__", f"extra-{index}")
        sources.append((name, name, None, None, plugin))

    for ep_name, ep_value, dist, version, plugin in sources:
        pm = pluggy.PluginManager(PROJECT_NAME)
        pm.add_hookspecs(DiscoverySpecs)
        try:
            pm.register(plugin, name=ep_name)
            provided_policies = [cls for group_ in pm.hook.cachepolicy_policies() for cls in group_]
            provided_models = [entry for group_ in pm.hook.cachepolicy_models() for entry in group_]
            provided_metrics = [cls for group_ in pm.hook.cachepolicy_metrics() for cls in group_]
        except Exception as exc:  # noqa: BLE001
            message = f"{type(exc).__name__}: {exc}"
            logger.warning("plugin %r failed to register: %s", ep_name, message)
            registry.records.append(PluginRecord(ep_name, "plugin", ep_value, dist, version, error=message))
            continue
        if not provided_policies and not provided_models and not provided_metrics:
            registry.records.append(
                PluginRecord(ep_name, "plugin", ep_value, dist, version,
                             error="the plugin provides no policy, model or metric")
            )
        for cls in provided_metrics:
            name = getattr(cls, "name", "") or repr(cls)
            error = _check_metric_class(cls)
            if error is None and name in registry.metrics:
                error = f"metric name {name!r} is already provided by {registry.metrics[name].__module__}"
            if error is None:
                registry.metrics[name] = cls
            registry.records.append(
                PluginRecord(name, "metric", ep_value, dist, version, (), summary=getattr(cls, "summary", ""),
                             error=error)
            )
        for cls in provided_policies:
            error = _check_policy_class(cls)
            name = getattr(cls, "name", "") or repr(cls)
            if error is None and name in registry.policies:
                error = f"policy name {name!r} is already provided by {registry.policies[name].__module__}"
            if error is None:
                registry.policies[name] = cls
            registry.records.append(
                PluginRecord(name, "policy", ep_value, dist, version, tuple(hook_names(cls)),
                             summary=getattr(cls, "summary", ""), error=error)
            )
        for entry in provided_models:
            error = None
            if not isinstance(entry, ModelEntry):
                error = f"cachepolicy_models returned {type(entry).__name__}, expected ModelEntry"
                name = repr(entry)
            else:
                name = entry.name
                if name in registry.models:
                    error = f"model name {name!r} is already provided"
            if error is None:
                registry.models[name] = entry
            registry.records.append(
                PluginRecord(name, "model", ep_value, dist, version, (), summary=getattr(entry, "summary", ""),
                             adapter=getattr(entry, "adapter", None), error=error)
            )
    return registry


def _check_policy_class(cls: Any) -> str | None:
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        return f"{cls!r} is not a subclass of cachepolicy.Policy"
    if not getattr(cls, "name", ""):
        return f"{cls.__qualname__} has no 'name'"
    if not attrs.has(cls):
        return f"{cls.__qualname__} is not an attrs class (decorate it with @attrs.frozen)"
    return None


def _check_metric_class(cls: Any) -> str | None:
    from cachepolicy.metrics import Metric

    if not (isinstance(cls, type) and issubclass(cls, Metric)):
        return f"{cls!r} is not a subclass of cachepolicy.metrics.Metric"
    if not getattr(cls, "name", ""):
        return f"{cls.__qualname__} has no 'name'"
    return None


_REGISTRY: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, discovered on first use (``refresh=True`` rediscovers)."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        _REGISTRY = discover()
    return _REGISTRY
