CREATE SCHEMA metering;
