"""The pure core: values in, values out. No etcd, no HTTP, no git, no clock.

YAML loading with positions (`yamlload`), the schema (`spec`), graph checks (`checks`),
the graph model (`graph`), `diff`, `render`, `report`, the reconcile values (`state`),
`plan()`, the settings tree (`settings`) and the error hierarchy (`errors`).
"""
