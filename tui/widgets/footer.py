"""The key bar: Textual's Footer, redrawn only when the keys it shows change."""
from textual.widgets import Footer


class KeyFooter(Footer):
    """Textual's Footer rebuilds its keys (unmounts and mounts a widget per key) whenever the bindings
    may have changed, which is at every focus change: each pane switch. The keys on offer mostly stay the
    same from pane to pane, so that rebuild was UI work for nothing right after each switch. This one
    rebuilds only when the (key, label, enabled) list it would show differs from the one shown."""

    _shown = None

    def bindings_changed(self, screen):
        if screen is self.screen and self.is_attached:
            keys = tuple((binding.key, binding.description, enabled)
                         for (_, binding, enabled, _) in screen.active_bindings.values() if binding.show)
            if keys == self._shown and self._bindings_ready:
                return
            self._shown = keys
        super().bindings_changed(screen)
