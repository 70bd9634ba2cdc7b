-- Argo CD resource actions offered on a SelfRewardRun: suspend and resume.
-- suspend is enabled while the run may still create Jobs; resume only when suspended.
local actions = {}
local suspended = obj.spec ~= nil and obj.spec.suspend == true
local finished = false
if obj.status ~= nil then
  finished = obj.status.phase == "Succeeded" or obj.status.phase == "Failed"
end
actions["suspend"] = {["disabled"] = suspended or finished, ["iconClass"] = "fa fa-fw fa-pause",
                      ["displayName"] = "Suspend run"}
actions["resume"] = {["disabled"] = not suspended, ["iconClass"] = "fa fa-fw fa-play",
                     ["displayName"] = "Resume run"}
return actions
