-- Set spec.suspend: the operator stops creating Jobs and suspends the running one.
if obj.spec == nil then
  obj.spec = {}
end
obj.spec.suspend = true
return obj
