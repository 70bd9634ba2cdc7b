"""Write argocd-cm-patch.yaml from the Lua files beside it (run after editing them):

    python gitops/argocd/render_cm_patch.py

tests/test_gitops.py fails when the patch and the Lua files disagree.
"""
from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
GROUP_KIND = "selfreward.dev_SelfRewardRun"
ACTIONS = ("suspend", "resume")


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper, value):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def _dump(data) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def actions_value() -> str:
    return _dump({
        "discovery.lua": (HERE / "actions" / "discovery.lua").read_text(),
        "definitions": [{"name": name, "action.lua": (HERE / "actions" / name / "action.lua").read_text()}
                        for name in ACTIONS],
    })


def patch() -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "argocd-cm", "namespace": "argocd",
                     "labels": {"app.kubernetes.io/name": "argocd-cm", "app.kubernetes.io/part-of": "argocd"}},
        "data": {
            f"resource.customizations.health.{GROUP_KIND}": (HERE / "health.lua").read_text(),
            f"resource.customizations.actions.{GROUP_KIND}": actions_value(),
        },
    }


HEADER = """\
# Argo CD health check and resource actions for SelfRewardRun, as argocd-cm entries.
# Generated from health.lua and actions/ by render_cm_patch.py; edit those, then rerun it.
# Install (a strategic-merge patch; other argocd-cm keys are kept):
#   kubectl -n argocd patch configmap argocd-cm --patch-file gitops/argocd/argocd-cm-patch.yaml
# or list this file under `patches:` of the kustomization that installs Argo CD.
"""


def render() -> str:
    return HEADER + _dump(patch())


if __name__ == "__main__":
    (HERE / "argocd-cm-patch.yaml").write_text(render())
    print("wrote", HERE / "argocd-cm-patch.yaml")
