-- Argo CD health check for selfreward.dev/SelfRewardRun.
-- Argo CD runs it under gopher-lua (Lua 5.1): the resource is the global `obj`, and
-- the result is a table with `status` (Healthy, Progressing, Degraded, Suspended,
-- Missing) and `message`. It reads what selfreward.status.RunStatus writes: phase,
-- observedGeneration, and the conditions Ready, Reconciling, Stalled, Succeeded,
-- Failed and Suspended (kstatus conventions).
local hs = {}

local function condition(status, ctype)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function is_true(status, ctype)
  local c = condition(status, ctype)
  return c ~= nil and c.status == "True"
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  local text = c.reason or fallback
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

local status = obj.status
local spec = obj.spec or {}
local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end

if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the run"
  return hs
end

-- A new spec the operator has not seen yet: the old verdict no longer applies.
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

if status.phase == "Failed" or is_true(status, "Failed") or is_true(status, "Stalled") then
  local c = condition(status, "Failed")
  if c == nil or c.status ~= "True" then
    c = condition(status, "Stalled")
  end
  hs.status = "Degraded"
  hs.message = describe(c, status.message or "Run failed")
  return hs
end

if spec.suspend == true or status.phase == "Suspended" or is_true(status, "Suspended") then
  hs.status = "Suspended"
  hs.message = status.message or "Run suspended"
  return hs
end

if status.phase == "Succeeded" or is_true(status, "Succeeded") or
    (is_true(status, "Ready") and not is_true(status, "Reconciling")) then
  hs.status = "Healthy"
  hs.message = status.message or "Run succeeded"
  if status.finalCheckpoint ~= nil then
    hs.message = hs.message .. " (model: " .. status.finalCheckpoint .. ")"
  end
  return hs
end

hs.status = "Progressing"
local parts = {}
if status.phase ~= nil then
  table.insert(parts, status.phase)
end
if status.progress ~= nil then
  table.insert(parts, "iterations " .. status.progress)
end
if status.currentPhase ~= nil then
  table.insert(parts, "step " .. status.currentPhase)
end
if status.message ~= nil and status.message ~= "" then
  table.insert(parts, status.message)
end
if #parts == 0 then
  hs.message = "Run in progress"
else
  hs.message = table.concat(parts, ", ")
end
return hs
