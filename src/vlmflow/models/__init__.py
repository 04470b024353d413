"""One module per model family (or close group of families): its registry entries
(`vlmflow.models.base.Family`: module names, chat markers, batching, the fast paths it takes,
its compile flag, extra per-token processor keys), its chat templates and its tiny builder.
`vlmflow.families` assembles the registry from the list of these modules."""
