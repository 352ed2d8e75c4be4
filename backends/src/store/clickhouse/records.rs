//! ClickHouse store, record roles: customers ([`Customers`]), billing marks ([`BillingMarks`]), the
//! webhook outbox ([`WebhookOutbox`]), API keys ([`ApiKeys`]) and the meters managed through the
//! API ([`MeterDefinitions`]). Latest write wins for each.

use async_trait::async_trait;

use super::*;

#[async_trait]
impl Customers for ClickHouseStore {
    async fn customer(&self, id: &str) -> Result<Option<Customer>> {
        let rec: Option<String> = self
            .client
            .query("SELECT record FROM customers WHERE id = ? ORDER BY updated_ms DESC LIMIT 1")
            .bind(id)
            .fetch_optional()
            .await
            .map_err(ch)?;
        Ok(rec.map(|r| serde_json::from_str(&r)).transpose()?)
    }

    async fn put_customer(&self, id: &str, customer: &Customer) -> Result<()> {
        let mut insert = self
            .client
            .insert::<CustomerRow>("customers")
            .await
            .map_err(ch)?;
        insert
            .write(&CustomerRow {
                id: id.to_owned(),
                record: serde_json::to_string(customer)?,
                updated_ms: customer.updated_ms,
            })
            .await
            .map_err(ch)?;
        insert.end().await.map_err(ch)
    }

    async fn customers_since(&self, updated_ms: i64) -> Result<Vec<(String, Customer)>> {
        let rows: Vec<(String, String)> = self
            .client
            .query(
                "SELECT id, argMax(record, updated_ms) FROM customers
                 WHERE updated_ms >= ? GROUP BY id",
            )
            .bind(updated_ms)
            .fetch_all()
            .await
            .map_err(ch)?;
        rows.into_iter()
            .map(|(id, rec)| Ok((id, serde_json::from_str(&rec)?)))
            .collect()
    }
}

#[async_trait]
impl BillingMarks for ClickHouseStore {
    async fn billing_marks(&self) -> Result<Vec<(String, String, String)>> {
        self.client
            .query(
                "SELECT customer, meter, argMax(mark, version) FROM billing_marks
                 GROUP BY customer, meter",
            )
            .fetch_all()
            .await
            .map_err(ch)
    }

    async fn put_billing_mark(&self, customer: &str, meter: &str, mark: &str) -> Result<()> {
        self.put_billing_marks(&[(customer.to_owned(), meter.to_owned(), mark.to_owned())])
            .await
    }

    async fn put_billing_marks(&self, marks: &[(String, String, String)]) -> Result<()> {
        let version = version_now();
        let mut insert = self
            .client
            .insert::<MarkRow>("billing_marks")
            .await
            .map_err(ch)?;
        for (customer, meter, mark) in marks {
            insert
                .write(&MarkRow {
                    customer: customer.clone(),
                    meter: meter.clone(),
                    mark: mark.clone(),
                    version,
                })
                .await
                .map_err(ch)?;
        }
        insert.end().await.map_err(ch)
    }
}

#[async_trait]
impl WebhookOutbox for ClickHouseStore {
    async fn pending_webhooks(&self) -> Result<Vec<WebhookDelivery>> {
        let rows: Vec<(String, u8)> = self
            .client
            .query(
                "SELECT argMax(delivery, version), argMax(done, version) AS d FROM webhook_outbox
                 GROUP BY id, url HAVING d = 0",
            )
            .fetch_all()
            .await
            .map_err(ch)?;
        rows.into_iter()
            .map(|(json, _)| Ok(serde_json::from_str(&json)?))
            .collect()
    }

    async fn put_webhook(&self, d: &WebhookDelivery) -> Result<()> {
        let mut insert = self
            .client
            .insert::<OutboxRow>("webhook_outbox")
            .await
            .map_err(ch)?;
        insert
            .write(&OutboxRow {
                id: d.id.clone(),
                url: d.url.clone(),
                done: u8::from(d.done),
                delivery: serde_json::to_string(d)?,
                version: version_now(),
            })
            .await
            .map_err(ch)?;
        insert.end().await.map_err(ch)
    }
}

#[async_trait]
impl ApiKeys for ClickHouseStore {
    async fn api_keys(&self) -> Result<Vec<(String, String)>> {
        self.client
            .query("SELECT id, argMax(record, version) FROM api_keys GROUP BY id")
            .fetch_all()
            .await
            .map_err(ch)
    }

    async fn put_api_key(&self, id: &str, record: &str, version: u64) -> Result<()> {
        let mut insert = self
            .client
            .insert::<ApiKeyRow>("api_keys")
            .await
            .map_err(ch)?;
        insert
            .write(&ApiKeyRow {
                id: id.to_owned(),
                record: record.to_owned(),
                version,
            })
            .await
            .map_err(ch)?;
        insert.end().await.map_err(ch)
    }
}

#[async_trait]
impl MeterDefinitions for ClickHouseStore {
    async fn meter_definitions(&self) -> Result<Vec<(String, String)>> {
        self.client
            .query("SELECT name, argMax(record, version) FROM meter_definitions GROUP BY name")
            .fetch_all()
            .await
            .map_err(ch)
    }

    async fn put_meter_definition(&self, name: &str, record: &str, version: u64) -> Result<()> {
        let mut insert = self
            .client
            .insert::<MeterDefinitionRow>("meter_definitions")
            .await
            .map_err(ch)?;
        insert
            .write(&MeterDefinitionRow {
                name: name.to_owned(),
                record: record.to_owned(),
                version,
            })
            .await
            .map_err(ch)?;
        insert.end().await.map_err(ch)
    }
}
